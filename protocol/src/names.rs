//! Node names and the network's DNS domain: the rules both sides apply. Pure: no IO.
//!
//! A node name is one DNS label that users type (`ssh user@gpu-server`) and that agents write into resolvers and
//! hosts files, so the rules are strict enough that a name can never be read as something else:
//! - 1 to 63 characters of `[a-z0-9-]`, not starting or ending with `-` (RFC 1123 host labels, lower case only, so
//!   two names never differ only in case);
//! - not a number that `inet_aton` would take as an address (`123`, `0x1f`): `ssh 123` must not mean 0.0.0.123;
//! - not a reserved name: `localhost` and the other names of a stock hosts file, and the names hosts look up
//!   automatically in their search domains (`wpad`, `isatap`), which a node must not be able to answer for.
//!
//! The coordinator is lenient at join ([`sanitize`]: a machine's hostname is not the user's choice) and strict on
//! admin renames ([`validate`]); the agent validates an explicit `--hostname` before it enrols and, as defence in
//! depth, writes only valid names into name-resolution files whatever its map says.

/// Longest DNS label.
pub const MAX_NAME_LEN: usize = 63;
/// Longest domain name in presentation form without the trailing dot (RFC 1035: 255 octets on the wire).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Name a join gets when its hostname has nothing usable (or only a reserved name) in it.
pub const FALLBACK_NAME: &str = "node";
/// The coordinator's default network domain. `.internal` is reserved for private use (ICANN, 2024), so it never
/// collides with a public name; `.local` would (mDNS).
pub const DEFAULT_DNS_DOMAIN: &str = "mesh.internal";

/// Names no node may have: a stock hosts file's names, and names resolvers and browsers look up on their own.
pub const RESERVED_NAMES: &[&str] = &[
    "localhost",
    "localdomain",
    "broadcasthost",
    "ip6-localhost",
    "ip6-loopback",
    "ip6-localnet",
    "ip6-mcastprefix",
    "ip6-allnodes",
    "ip6-allrouters",
    "ip6-allhosts",
    "wpad",
    "isatap",
];

/// What is allowed, said once so every refusal says the same.
pub const NAME_RULES: &str = "a name is one DNS label: 1 to 63 lowercase letters (a-z), digits and `-`, not starting \
                              or ending with `-`, not only digits, and not a reserved name such as `localhost`";

/// Why a name is not acceptable; the message says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a name must not be empty: {NAME_RULES}")]
    Empty,
    #[error("the name is {0} characters long: {NAME_RULES}")]
    TooLong(usize),
    #[error("`{given}` has characters a name cannot have (try `{suggestion}`): {NAME_RULES}")]
    Characters { given: String, suggestion: String },
    #[error("`{0}` starts or ends with `-`: {NAME_RULES}")]
    Hyphen(String),
    #[error("`{0}` reads as an IP address: {NAME_RULES}")]
    Numeric(String),
    #[error("`{0}` is reserved: {NAME_RULES}")]
    Reserved(String),
}

/// Checks a name a person chose (an admin rename, a device registration, an explicit `--hostname`).
pub fn validate(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.chars().count()));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(NameError::Characters {
            given: name.escape_debug().to_string(),
            suggestion: sanitize(name),
        });
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::Hyphen(name.to_string()));
    }
    if reads_as_address(name) {
        return Err(NameError::Numeric(name.to_string()));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(NameError::Reserved(name.to_string()));
    }
    Ok(())
}

/// Whether `inet_aton` (and so `getaddrinfo`, `ping`, `ssh`) would take the label for an IPv4 address: all decimal
/// digits (`123`, octal `0777`) or `0x` and hex digits.
fn reads_as_address(label: &str) -> bool {
    let hex = label.strip_prefix("0x");
    match hex {
        Some(rest) => rest.bytes().all(|b| b.is_ascii_hexdigit()),
        None => label.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// Turns a machine's hostname into a valid name: lower case, every other character `-`, runs of `-` collapsed and
/// trimmed, the first label only, at most 63 characters; a number gets a `node-` prefix and a reserved or empty
/// result becomes [`FALLBACK_NAME`]. Always returns a name [`validate`] accepts.
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
    if out.is_empty() || RESERVED_NAMES.contains(&out.as_str()) {
        return FALLBACK_NAME.to_string();
    }
    if reads_as_address(&out) {
        out.insert_str(0, "node-");
        out.truncate(MAX_NAME_LEN);
        while out.ends_with('-') {
            out.pop();
        }
    }
    out
}

/// Why a network domain is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error(
        "`{0}` is not a valid DNS domain: use dot-separated labels of a-z, 0-9 and `-` (e.g. `mesh.internal`), at most 253 characters"
    )]
    Syntax(String),
    #[error(
        "`{0}` is under `.local`, which belongs to multicast DNS (mDNS/Bonjour): use a name under `.internal` (e.g. `mesh.internal`) or a domain you own"
    )]
    Mdns(String),
}

/// Checks the coordinator's `--dns-domain` and returns its canonical form (lower case, no trailing dot).
pub fn normalize_domain(domain: &str) -> Result<String, DomainError> {
    let canonical = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let labels_ok = canonical.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= MAX_NAME_LEN
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    if canonical.is_empty() || canonical.len() > MAX_DOMAIN_LEN || !labels_ok {
        return Err(DomainError::Syntax(domain.to_string()));
    }
    if canonical == "local" || canonical.ends_with(".local") {
        return Err(DomainError::Mdns(domain.to_string()));
    }
    Ok(canonical)
}

/// The fully qualified name of `name` in `domain` (`gpu-server.mesh.internal`).
pub fn fqdn(name: &str, domain: &str) -> String {
    format!("{name}.{domain}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizes_hostnames_into_valid_names() {
        assert_eq!(sanitize("Laptop"), "laptop");
        assert_eq!(sanitize("My Laptop!!"), "my-laptop");
        assert_eq!(sanitize("gpu1.lab.example.com"), "gpu1");
        assert_eq!(sanitize("--x__y--"), "x-y");
        assert_eq!(sanitize("ÜBER"), "ber");
        assert_eq!(sanitize(""), "node");
        assert_eq!(sanitize("***"), "node");
        assert_eq!(sanitize("localhost"), "node");
        assert_eq!(sanitize("LOCALHOST.localdomain"), "node");
        assert_eq!(sanitize("1234"), "node-1234");
        assert_eq!(sanitize("0x1f"), "node-0x1f");
        assert_eq!(sanitize(&"a".repeat(100)).len(), 63);
        assert_eq!(sanitize(&"7".repeat(100)).len(), 63);
        for hostile in [
            "../x",
            "a b",
            "10.77.0.9",
            "wpad",
            "Jöhn's MacBook Pro",
            "\u{202e}evil",
            &"x".repeat(300),
        ] {
            let name = sanitize(hostile);
            assert!(validate(&name).is_ok(), "{hostile:?} -> {name:?}");
        }
    }

    #[test]
    fn refuses_names_that_could_be_read_as_something_else() {
        assert!(validate("gpu-server").is_ok());
        assert!(validate("laptop-2").is_ok());
        assert!(validate("1gpu").is_ok());
        assert!(validate("0xg").is_ok(), "not hex");
        assert_eq!(validate(""), Err(NameError::Empty));
        assert_eq!(validate(&"a".repeat(300)), Err(NameError::TooLong(300)));
        assert!(matches!(validate("Laptop"), Err(NameError::Characters { .. })));
        assert!(matches!(validate("../x"), Err(NameError::Characters { .. })));
        assert!(matches!(validate("a b"), Err(NameError::Characters { .. })));
        assert!(matches!(validate("10.77.0.9"), Err(NameError::Characters { .. })));
        assert!(matches!(validate("gpü"), Err(NameError::Characters { .. })));
        assert_eq!(validate("-x"), Err(NameError::Hyphen("-x".into())));
        assert_eq!(validate("123"), Err(NameError::Numeric("123".into())));
        assert_eq!(
            validate("0x1F".to_lowercase().as_str()),
            Err(NameError::Numeric("0x1f".into()))
        );
        assert_eq!(validate("localhost"), Err(NameError::Reserved("localhost".into())));
        assert_eq!(validate("wpad"), Err(NameError::Reserved("wpad".into())));
        // Every refusal says what is allowed.
        let message = validate("a b").expect_err("refused").to_string();
        assert!(message.contains("a-z") && message.contains("`a-b`"), "{message}");
    }

    #[test]
    fn domains_are_canonical_and_never_mdns() {
        assert_eq!(normalize_domain("mesh.internal").as_deref(), Ok("mesh.internal"));
        assert_eq!(normalize_domain("Mesh.Example.COM.").as_deref(), Ok("mesh.example.com"));
        assert_eq!(normalize_domain("corp").as_deref(), Ok("corp"));
        for bad in [
            "",
            ".",
            "a..b",
            "-a.b",
            "a b",
            "x/y",
            "ä.internal",
            &format!("{}.x", "a".repeat(64)),
        ] {
            assert!(matches!(normalize_domain(bad), Err(DomainError::Syntax(_))), "{bad:?}");
        }
        assert!(matches!(normalize_domain("mesh.local"), Err(DomainError::Mdns(_))));
        assert_eq!(fqdn("gpu", "mesh.internal"), "gpu.mesh.internal");
    }
}
