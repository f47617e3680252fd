//! FlakeHub output references (`org/flake/version[#attr]`), validated strictly.
//!
//! A reference comes from user-data, so it is untrusted: it is checked character by character
//! before anything uses it, and it is never handed to a shell. The accepted form:
//!
//! - an optional leading `https://flakehub.com/f/`;
//! - `org` and `flake`: FlakeHub's name characters (ASCII letters, digits, `-`, `_`, `.`), not
//!   starting with `.` or `-`, without `..`, at most 64 characters each;
//! - `version`: a Cargo-style version constraint as FlakeHub takes it (`*`, `0.1`,
//!   `=0.1.42+rev-abc123`, `~1.0`, `^1`, `>=1.2, <2`). Characters: ASCII letters, digits and
//!   `. * = ~ ^ < > + - ,`; a comma may be followed by one space, no other whitespace. The grammar
//!   is then checked with the `semver` crate's `VersionReq` (Cargo's own rules);
//! - `#attr` (optional): a dot-separated attribute path whose parts are made of ASCII letters,
//!   digits, `_`, `-` and `'` (no quoting, no spaces). Without it the attribute is
//!   `nixosConfigurations.<short hostname>` (the hostname up to its first dot).
//!
//! The whole reference is at most 256 characters.

use std::fmt;
use std::str::FromStr;

/// The longest reference accepted, in bytes (the prefix included).
pub(crate) const MAX_LEN: usize = 256;
/// The longest org or flake name accepted.
const MAX_NAME_LEN: usize = 64;
/// The longest hostname label (DNS's limit, and NixOS's for `networking.hostName`).
const MAX_HOST_LEN: usize = 63;
/// The prefix of a FlakeHub URL that may be given in front of a reference.
const URL_PREFIX: &str = "https://flakehub.com/f/";
/// What a valid reference looks like, for error messages.
const EXAMPLE: &str = "e.g. my-org/infra/0.1#nixosConfigurations.web";

/// A FlakeHub output reference: `org/flake/version[#attr]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlakeRef {
    pub(crate) org: String,
    pub(crate) flake: String,
    /// The version constraint as given (`*`, `0.1`, `=0.1.42+rev-abc`, ...).
    pub(crate) version: String,
    /// The attribute path after `#`, if one was given.
    pub(crate) attr: Option<String>,
}

impl FlakeRef {
    /// The attribute path to apply: the given one, or `nixosConfigurations.<name>` where `name`
    /// is the hostname's first label (`web-1` for `web-1.example.com`).
    ///
    /// fh itself takes the whole hostname (`nixosConfigurations.web-1.example.com`, an attribute
    /// path of four names that no flake has), so a server named by its FQDN would never deploy.
    /// A NixOS configuration is named for `networking.hostName`, which may not hold a dot: the
    /// short name is the one it can have. The error (a hostname no configuration can be named
    /// by) is one line and says to give `#attr`.
    pub fn attr_or_default(&self, hostname: &str) -> Result<String, String> {
        if let Some(attr) = &self.attr {
            return Ok(attr.clone());
        }
        let short = hostname.split('.').next().unwrap_or_default();
        let fits = !short.is_empty()
            && short.len() <= MAX_HOST_LEN
            && short
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if fits {
            Ok(format!("nixosConfigurations.{short}"))
        } else {
            Err(format!(
                "the hostname {} names no NixOS configuration (letters, digits, '-' and '_' before the first dot); give the attribute in the reference: {}#nixosConfigurations.NAME",
                shown(hostname),
                self
            ))
        }
    }

    /// The exact reference for `fh apply nixos`: `org/flake/=<version>#<attr>`, so that fh
    /// applies the release that was resolved rather than resolving a moving constraint again.
    pub fn exact(&self, version: &str, attr: &str) -> String {
        format!("{}/{}/={version}#{attr}", self.org, self.flake)
    }
}

impl fmt::Display for FlakeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.org, self.flake, self.version)?;
        if let Some(attr) = &self.attr {
            write!(f, "#{attr}")?;
        }
        Ok(())
    }
}

impl FromStr for FlakeRef {
    type Err = String;

    /// Parses and validates a reference. The error is one line: what is wrong, and what a valid
    /// reference looks like.
    fn from_str(input: &str) -> Result<Self, String> {
        parse(input).map_err(|what| format!("{what}; expected org/flake/version[#attr], {EXAMPLE}"))
    }
}

/// `text` for an error message: one line, shortened; by its length when it may hold a token.
fn shown(text: &str) -> String {
    crate::plumbing::text::shown_value(text)
}

fn parse(input: &str) -> Result<FlakeRef, String> {
    if input.is_empty() {
        return Err("the flake reference is empty".into());
    }
    if input.len() > MAX_LEN {
        return Err(format!(
            "the flake reference is {} characters long, at most {MAX_LEN} are accepted",
            input.len()
        ));
    }
    if let Some(c) = input.chars().find(|c| c.is_control()) {
        return Err(format!(
            "{} contains a control character ({})",
            shown(input),
            c.escape_unicode()
        ));
    }
    if !input.is_ascii() {
        return Err(format!("{} contains non-ASCII characters", shown(input)));
    }
    let rest = input.strip_prefix(URL_PREFIX).unwrap_or(input);
    if rest.starts_with("http://") || rest.starts_with("https://") {
        return Err(format!(
            "{} is a URL; only https://flakehub.com/f/ may lead a reference",
            shown(input)
        ));
    }
    if rest.starts_with("flakehub.com/") {
        return Err(format!(
            "{}: leave out 'flakehub.com/' (or write the whole https://flakehub.com/f/ prefix)",
            shown(input)
        ));
    }

    let (path, attr) = match rest.split_once('#') {
        Some((path, attr)) => (path, Some(attr)),
        None => (rest, None),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (org, flake, version) = match parts.as_slice() {
        [org, flake, version] => (*org, *flake, *version),
        [_, _] => {
            return Err(format!(
                "{} has no version (use '*' for the newest release, or a constraint such as 0.1)",
                shown(input)
            ));
        }
        [_] => return Err(format!("{} is not org/flake/version", shown(input))),
        _ => {
            return Err(format!(
                "{} has {} '/'-separated parts, not three",
                shown(input),
                parts.len()
            ));
        }
    };
    check_name("org", org)?;
    check_name("flake name", flake)?;
    check_version(version)?;
    let attr = match attr {
        None => None,
        Some(attr) => {
            check_attr(attr)?;
            Some(attr.to_string())
        }
    };
    Ok(FlakeRef {
        org: org.to_string(),
        flake: flake.to_string(),
        version: version.to_string(),
        attr,
    })
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "the {what} is longer than {MAX_NAME_LEN} characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "the {what} {} contains {}; FlakeHub names use letters, digits, '-', '_' and '.'",
            shown(name),
            shown(&c.to_string())
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!(
            "the {what} {} starts with '{}'",
            shown(name),
            &name[..1]
        ));
    }
    if name.contains("..") {
        return Err(format!("the {what} {} contains '..'", shown(name)));
    }
    Ok(())
}

fn check_version(version: &str) -> Result<(), String> {
    if version.is_empty() {
        return Err("the version is empty (use '*' for the newest release)".into());
    }
    if version.ends_with(".tar.gz") {
        return Err(format!(
            "the version {} ends in .tar.gz (a flake input URL); leave out '.tar.gz'",
            shown(version)
        ));
    }
    if let Some(c) = version.chars().find(|c| {
        !(c.is_ascii_alphanumeric()
            || matches!(
                c,
                '.' | '*' | '=' | '~' | '^' | '<' | '>' | '+' | '-' | ',' | ' '
            ))
    }) {
        return Err(format!(
            "the version {} contains {}; a version constraint uses letters, digits and . * = ~ ^ < > + - ,",
            shown(version),
            shown(&c.to_string())
        ));
    }
    // Whitespace: only a single space right after a comma.
    let bytes = version.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b' ' && (i == 0 || bytes[i - 1] != b',') {
            return Err(format!(
                "the version {} contains a space; only one space after a comma is allowed (>=1.2, <2)",
                shown(version)
            ));
        }
    }
    if version.contains("..") {
        return Err(format!("the version {} contains '..'", shown(version)));
    }
    if let Err(e) = semver::VersionReq::parse(version) {
        return Err(format!(
            "the version {} is not a version constraint ({e}); e.g. *, 0.1, =0.1.42, ~1.0, >=1.2, <2",
            shown(version)
        ));
    }
    Ok(())
}

fn check_attr(attr: &str) -> Result<(), String> {
    if attr.is_empty() {
        return Err(
            "the attribute after '#' is empty (leave out '#' for nixosConfigurations.<short hostname>)"
                .into(),
        );
    }
    if attr.contains('#') {
        return Err(format!(
            "the attribute {} contains a second '#'",
            shown(attr)
        ));
    }
    for part in attr.split('.') {
        if part.is_empty() {
            return Err(format!(
                "the attribute path {} has an empty part (a leading, trailing or double '.')",
                shown(attr)
            ));
        }
        if let Some(c) = part
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '\'')))
        {
            return Err(format!(
                "the attribute path {} contains {}; attribute names use letters, digits, '_', '-' and an apostrophe (no quoting)",
                shown(attr),
                shown(&c.to_string())
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> FlakeRef {
        s.parse()
            .unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn err(s: &str) -> String {
        match s.parse::<FlakeRef>() {
            Ok(r) => panic!("{s:?} should be refused, got {r:?}"),
            Err(e) => {
                assert!(!e.contains('\n'), "one line: {e:?}");
                assert!(e.contains("expected org/flake/version[#attr]"), "{e}");
                e
            }
        }
    }

    #[test]
    fn valid_references() {
        let r = ok("my-org/infra/0.1#nixosConfigurations.web");
        assert_eq!(r.org, "my-org");
        assert_eq!(r.flake, "infra");
        assert_eq!(r.version, "0.1");
        assert_eq!(r.attr.as_deref(), Some("nixosConfigurations.web"));
        assert_eq!(r.to_string(), "my-org/infra/0.1#nixosConfigurations.web");

        let r = ok("https://flakehub.com/f/DeterminateSystems/fh/*");
        assert_eq!(r.to_string(), "DeterminateSystems/fh/*");
        assert_eq!(r.attr, None);

        for s in [
            "a/b/*",
            "a/b/0.1",
            "a/b/0",
            "a/b/1.2.3",
            "a/b/=0.1.42+rev-0123456789abcdef0123456789abcdef01234567",
            "a/b/0.1.42+rev-abc",
            "a/b/~1.0",
            "a/b/^1",
            "a/b/>=1.2, <2",
            "a/b/>=1.2,<2",
            "a/b/0.1.*",
            "a/b/=1.0.0-beta.1",
            "My_Org.x/nix-pkgs_2.0/0.1#packages.x86_64-linux.default",
            "o/f/0.1#nixosConfigurations.web-1",
            "o/f/0.1#nixosConfigurations.1web",
            "o/f/0.1#a.b'",
        ] {
            let r = ok(s);
            assert_eq!(r.to_string(), s, "canonical form");
        }
    }

    #[test]
    fn default_attr_and_exact() {
        let r = ok("my-org/infra/0.1");
        assert_eq!(r.attr_or_default("web").unwrap(), "nixosConfigurations.web");
        // A server named by its FQDN: the configuration is named by the short name.
        assert_eq!(
            r.attr_or_default("web-1.example.com").unwrap(),
            "nixosConfigurations.web-1"
        );
        for bad in ["", ".example.com", "we$b", "web\n1", &"w".repeat(64)] {
            let e = r.attr_or_default(bad).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
            assert!(
                e.ends_with(
                    "give the attribute in the reference: my-org/infra/0.1#nixosConfigurations.NAME"
                ),
                "{e}"
            );
        }
        let r = ok("my-org/infra/0.1#nixosConfigurations.db");
        assert_eq!(r.attr_or_default("web").unwrap(), "nixosConfigurations.db");
        assert_eq!(r.attr_or_default("").unwrap(), "nixosConfigurations.db");
        assert_eq!(
            r.exact("0.1.42+rev-abc", "nixosConfigurations.db"),
            "my-org/infra/=0.1.42+rev-abc#nixosConfigurations.db"
        );
    }

    #[test]
    fn invalid_references() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("my-org/infra", "no version"),
            ("my-org/infra/", "version is empty"),
            ("infra", "not org/flake/version"),
            ("a/b/c/d", "4 '/'-separated parts"),
            ("/b/0.1", "org is empty"),
            ("a//0.1", "flake name is empty"),
            (".a/b/0.1", "starts with '.'"),
            ("-a/b/0.1", "starts with '-'"),
            ("a/.b/0.1", "starts with '.'"),
            ("a..b/c/0.1", "contains '..'"),
            ("a/b/0..1", "contains '..'"),
            ("a b/c/0.1", "contains ' '"),
            ("a/b/0.1 ", "contains a space"),
            (" a/b/0.1", "contains ' '"),
            ("a/b/0.1\n", "control character"),
            ("a/b/0.1#x\u{7}", "control character"),
            ("a/b\u{0}/0.1", "control character"),
            ("a/b/0.1\t", "control character"),
            ("a/b/0.1\u{a0}", "non-ASCII"),
            ("ä/b/0.1", "non-ASCII"),
            ("a/b;rm -rf/0.1", "contains ';'"),
            ("a/$(id)/0.1", "contains '$'"),
            ("a/`id`/0.1", "contains '`'"),
            ("a/b/0.1;id", "contains ';'"),
            ("a/b/0.1|id", "contains '|'"),
            ("a/b/$VERSION", "contains '$'"),
            ("a/b/latest", "not a version constraint"),
            ("a/b/>=1.2 <2", "contains a space"),
            ("a/b/>=1.2,  <2", "contains a space"),
            ("a/b/0.1.tar.gz", ".tar.gz"),
            ("https://flakehub.com/f/a/b/0.1.tar.gz", ".tar.gz"),
            ("http://flakehub.com/f/a/b/0.1", "is a URL"),
            ("https://example.com/f/a/b/0.1", "is a URL"),
            ("flakehub.com/f/a/b/0.1", "leave out 'flakehub.com/'"),
            ("a/b/0.1#", "after '#' is empty"),
            ("a/b/0.1#x#y", "second '#'"),
            ("a/b/0.1#.x", "empty part"),
            ("a/b/0.1#x.", "empty part"),
            ("a/b/0.1#x..y", "empty part"),
            ("a/b/0.1#x.\"y.z\"", "contains '\"'"),
            ("a/b/0.1#x y", "contains ' '"),
            ("a/b/0.1#x;id", "contains ';'"),
            ("a/b/0.1#x/y", "contains '/'"),
            ("a/b/0.1#${x}", "contains '$'"),
        ];
        for (input, expected) in cases {
            let e = err(input);
            assert!(
                e.contains(expected),
                "{input:?}: error {e:?} should mention {expected:?}"
            );
        }
    }

    #[test]
    fn too_long() {
        let long = format!("a/b/0.1#{}", "x".repeat(MAX_LEN));
        assert!(err(&long).contains("at most 256"));
        let name = format!("{}/b/0.1", "o".repeat(65));
        assert!(err(&name).contains("longer than 64"));
        // The limit counts the URL prefix too; exactly 256 is fine.
        let exact = format!("a/b/0.1#{}", "x".repeat(MAX_LEN - 8));
        assert_eq!(exact.len(), MAX_LEN);
        ok(&exact);
    }

    #[test]
    fn messages_escape_what_they_show() {
        let e = err("a/b/0.1\u{1b}[31m");
        assert!(!e.contains('\u{1b}'), "{e:?}");
        let e = err(&format!("a/b{}/0.1", "\u{0}".repeat(200)));
        assert!(!e.contains('\u{0}'));
    }
}
