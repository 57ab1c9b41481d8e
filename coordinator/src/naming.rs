//! Node names: pure functions that turn a hostname into a unique DNS-safe label. No IO.
//!
//! What a name may be is decided in `meshd_protocol::names` (the agent applies the same rules). Joins are lenient
//! (`My Laptop` becomes `my-laptop`, a second `laptop` becomes `laptop-2`) because a machine's hostname is not the
//! user's choice; admin renames are strict (an invalid name is an error, a taken one a conflict) because the admin
//! typed exactly what they want.

pub use meshd_protocol::names::{MAX_NAME_LEN, sanitize};

/// Why a name given by an admin is not acceptable ([`meshd_protocol::names::validate`]), as the message an API
/// client sees.
pub fn validate(name: &str) -> Result<(), String> {
    meshd_protocol::names::validate(name).map_err(|e| e.to_string())
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
        assert!(
            validate("localhost").expect_err("reserved").contains("a-z"),
            "says what is allowed"
        );
        assert!(validate_tags(&["gpu".into(), "team:ml".into()]).is_ok());
        assert!(validate_tags(&["has space".into()]).is_err());
        assert_eq!(normalize_tags(vec!["b".into(), "a".into(), "b".into()]), vec!["a", "b"]);
    }
}
