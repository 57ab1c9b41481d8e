//! Node names: pure functions that turn a hostname into a unique DNS-safe label. No IO.
//!
//! A name is one DNS label: 1 to 63 characters of `[a-z0-9-]`, not starting or ending with `-`. Joins are lenient
//! (`My Laptop` becomes `my-laptop`, a second `laptop` becomes `laptop-2`) because a machine's hostname is not the
//! user's choice; admin renames are strict (an invalid name is an error, a taken one a conflict) because the admin
//! typed exactly what they want.

/// Longest DNS label.
pub const MAX_NAME_LEN: usize = 63;
/// Name used when a hostname has no usable character at all.
pub const FALLBACK_NAME: &str = "node";

/// Lowercases, maps every other character to `-`, collapses runs of `-`, trims them at both ends, truncates to 63.
pub fn sanitize(hostname: &str) -> String {
    let mut out = String::with_capacity(hostname.len().min(MAX_NAME_LEN));
    // Only the first label of a fully qualified name: `gpu1.lab.example.com` -> `gpu1`.
    let first_label = hostname.trim().split('.').next().unwrap_or_default();
    for c in first_label.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
        if out.len() == MAX_NAME_LEN {
            break;
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() { FALLBACK_NAME.to_string() } else { out }
}

/// Why a name given by an admin is not acceptable.
pub fn validate(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("a name must be 1 to {MAX_NAME_LEN} characters long"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "`{name}` is not DNS-safe: use lowercase letters, digits and `-` only (e.g. `{}`)",
            sanitize(name)
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("`{name}` must not start or end with `-`"));
    }
    Ok(())
}

/// The first of `base`, `base-2`, `base-3`, ... for which `taken` is false. `base` must be sanitized.
pub fn unique(base: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    for n in 2u64.. {
        let suffix = format!("-{n}");
        let mut stem = base[..base.len().min(MAX_NAME_LEN - suffix.len())].to_string();
        while stem.ends_with('-') {
            stem.pop();
        }
        let candidate = format!("{stem}{suffix}");
        if !taken(&candidate) {
            return candidate;
        }
    }
    unreachable!("some suffix is free: there are fewer nodes than u64 values")
}

/// Tags: short labels (`gpu`, `team:ml`) that nodes inherit from tokens and admins set.
pub fn validate_tags(tags: &[String]) -> Result<(), String> {
    const MAX_TAGS: usize = 32;
    const MAX_TAG_LEN: usize = 64;
    if tags.len() > MAX_TAGS {
        return Err(format!("at most {MAX_TAGS} tags"));
    }
    for tag in tags {
        let ok = !tag.is_empty()
            && tag.len() <= MAX_TAG_LEN
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':' | b'.'));
        if !ok {
            return Err(format!(
                "tag `{tag}` is not valid: use 1 to {MAX_TAG_LEN} letters, digits or `-_:.` (e.g. `gpu`, `team:ml`)"
            ));
        }
    }
    Ok(())
}

/// Tags sorted and deduplicated, so equal sets compare equal.
pub fn normalize_tags(mut tags: Vec<String>) -> Vec<String> {
    tags.sort();
    tags.dedup();
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizes_hostnames() {
        assert_eq!(sanitize("Laptop"), "laptop");
        assert_eq!(sanitize("My Laptop!!"), "my-laptop");
        assert_eq!(sanitize("gpu1.lab.example.com"), "gpu1");
        assert_eq!(sanitize("--x__y--"), "x-y");
        assert_eq!(sanitize("ÜBER"), "ber");
        assert_eq!(sanitize(""), "node");
        assert_eq!(sanitize("***"), "node");
        assert_eq!(sanitize(&"a".repeat(100)).len(), 63);
        assert!(validate(&sanitize("  Some -- weird_Name ")).is_ok());
    }

    #[test]
    fn makes_names_unique() {
        let taken = ["laptop", "laptop-2"];
        assert_eq!(unique("laptop", |n| taken.contains(&n)), "laptop-3");
        assert_eq!(unique("gpu", |n| taken.contains(&n)), "gpu");
        let long = "a".repeat(63);
        let got = unique(&long, |n| n == long);
        assert_eq!(got.len(), 63);
        assert!(got.ends_with("-2"));
    }

    #[test]
    fn validates_names_and_tags() {
        assert!(validate("laptop-2").is_ok());
        assert!(validate("Laptop").is_err());
        assert!(validate("-x").is_err());
        assert!(validate("").is_err());
        assert!(validate_tags(&["gpu".into(), "team:ml".into()]).is_ok());
        assert!(validate_tags(&["has space".into()]).is_err());
        assert_eq!(normalize_tags(vec!["b".into(), "a".into(), "b".into()]), vec!["a", "b"]);
    }
}
