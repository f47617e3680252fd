//! Text from the metadata, checked where it enters, in types that only the check can make.
//!
//! Each kind of string that may reach a file, a D-Bus call or a log line has its own type.
//! A `Hostname`, `DomainName`, `IfName`, `Label` or `SshKey` holds no line break, no control
//! character and nothing longer than its bound, so rendering one into a `.network` file, the
//! keys file, hostnamed or the journal cannot add lines, sections or terminal escapes.

use std::fmt;

use serde::Serialize;

/// How much of a rejected value a message shows.
const QUOTE_CHARS: usize = 64;

/// A value from a document for a message: in single quotes, control characters, line breaks
/// and quotes escaped (as Rust's `escape_debug` does), cut after 64 characters. Every message
/// that shows document text shows it through this, so a log line stays one line.
pub(crate) fn quote(text: &str) -> String {
    let mut out = String::from("'");
    let mut chars = text.chars();
    for c in chars.by_ref().take(QUOTE_CHARS) {
        match c {
            '"' => out.push('"'),
            c => out.extend(c.escape_debug()),
        }
    }
    if chars.next().is_some() {
        out.push('…');
    }
    out.push('\'');
    out
}

macro_rules! checked_text {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub(crate) struct $name(String);

        impl $name {
            // Not every type made here reads its text back outside the tests.
            #[allow(dead_code)]
            pub(crate) fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

checked_text!(
    /// A hostname as the kernel and hostnamed take it: at most 64 characters, labels of ASCII
    /// letters, digits and hyphens (not at either end), separated by dots.
    Hostname
);
checked_text!(
    /// A DNS search domain for networkd's `Domains=`: at most 253 characters, labels of ASCII
    /// letters, digits, hyphens and underscores, separated by dots (a trailing dot is dropped).
    DomainName
);
checked_text!(
    /// A network interface name as the metadata gives it (`eth0`), or an alias of one
    /// (`eth0:0`): at most 15 characters of ASCII letters, digits, `_`, `.` and `-`, plus a
    /// `:label` suffix of the same for an alias.
    IfName
);
checked_text!(
    /// A name for people (a private network's name, a region): 1 to 64 characters, none of
    /// them a control or formatting character.
    Label
);
checked_text!(
    /// One OpenSSH public key line, `type base64 [comment]`, without options, white space
    /// folded to single spaces.
    SshKey
);

impl Hostname {
    pub(crate) fn parse(name: &str) -> Result<Self, &'static str> {
        if name.len() > 64 {
            return Err("is longer than 64 characters");
        }
        let ok = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-')
            });
        if ok {
            Ok(Hostname(name.to_string()))
        } else {
            Err("is not a valid hostname (letters, digits, hyphens and dots)")
        }
    }
}

impl DomainName {
    pub(crate) fn parse(name: &str) -> Result<Self, &'static str> {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() || name.len() > 253 {
            return Err("is not a domain name (1 to 253 characters)");
        }
        let ok = name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        });
        if ok {
            Ok(DomainName(name.to_string()))
        } else {
            Err("is not a domain name (letters, digits, hyphens and dots)")
        }
    }
}

fn is_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c))
}

impl IfName {
    pub(crate) fn parse(name: &str) -> Result<Self, &'static str> {
        let ok = match name.split_once(':') {
            None => is_ifname(name),
            Some((base, label)) => is_ifname(base) && is_ifname(label),
        };
        if ok {
            Ok(IfName(name.to_string()))
        } else {
            Err("is not an interface name (up to 15 letters, digits, '_', '.', '-')")
        }
    }

    /// For an alias (`eth0:0`), the name of the interface it belongs to (`eth0`).
    pub(crate) fn alias_of(&self) -> Option<&str> {
        self.0.split_once(':').map(|(base, _)| base)
    }
}

/// Not a control character, and none of the invisible ones that change how text reads: line
/// and paragraph separators, bidirectional overrides and isolates, zero-width characters, the
/// soft hyphen and the byte order mark.
fn is_safe_char(c: char) -> bool {
    !c.is_control()
        && !matches!(c,
            '\u{00ad}'
            | '\u{061c}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}')
}

impl Label {
    pub(crate) fn parse(text: &str) -> Result<Self, &'static str> {
        let count = text.chars().count();
        if !(1..=64).contains(&count) {
            return Err("is not a name (1 to 64 characters)");
        }
        if text.chars().all(is_safe_char) {
            Ok(Label(text.to_string()))
        } else {
            Err("has control or formatting characters")
        }
    }
}

/// Key types OpenSSH knows (`ssh-ed25519`, `ssh-rsa`, `ecdsa-sha2-nistp256`, security keys).
fn is_key_type(word: &str) -> bool {
    let known = ["ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-sha2-"]
        .iter()
        .any(|prefix| word.starts_with(prefix));
    known
        && word.len() <= 64
        && word
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-@._".contains(&c))
}

impl SshKey {
    /// One line of an authorized-keys text, trimmed (a trailing `\n` or `\r\n` is no part of
    /// the key). Options (`command=`, `from=`) are refused: a key from the metadata is the
    /// Hetzner project's key for root, and options belong in `/root/.ssh/authorized_keys`.
    pub(crate) fn parse(line: &str) -> Result<Self, &'static str> {
        let line = line.trim();
        if !line.chars().all(|c| is_safe_char(c) || c == '\t') {
            return Err("has line breaks, control or formatting characters inside");
        }
        let mut words = line.split_whitespace();
        let key_type = words.next().ok_or("is empty")?;
        if !is_key_type(key_type) {
            return Err(if key_type.contains('=') || key_type.contains(',') {
                "has options (such as command= or from=), which are not taken from the metadata; put such a key in /root/.ssh/authorized_keys"
            } else {
                "is not an OpenSSH public key (type, base64 key, comment)"
            });
        }
        let blob = words.next().ok_or("has no key after its type")?;
        let blob_ok = blob.len() >= 16
            && blob
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/' || c == b'=');
        if !blob_ok {
            return Err("is not an OpenSSH public key (its key is not base64)");
        }
        let mut key = format!("{key_type} {blob}");
        for word in words {
            key.push(' ');
            key.push_str(word);
        }
        Ok(SshKey(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_one_line_and_bounds_length() {
        assert_eq!(quote("eth0"), "'eth0'");
        assert_eq!(quote("a\nb\u{1b}[31m"), "'a\\nb\\u{1b}[31m'");
        assert_eq!(quote("it's"), "'it\\'s'");
        let long = quote(&"x".repeat(1000));
        assert_eq!(long.chars().count(), 64 + 3);
        assert!(long.ends_with("…'"));
    }

    #[test]
    fn names_and_labels() {
        assert!(IfName::parse("eth0").is_ok());
        assert_eq!(IfName::parse("eth0:0").unwrap().alias_of(), Some("eth0"));
        assert_eq!(IfName::parse("enp1s0").unwrap().alias_of(), None);
        for bad in [
            "",
            "eth0\n[Network]",
            "a b",
            "sixteen-chars-xx",
            "eth0:",
            ":0",
            "e/0",
        ] {
            assert!(IfName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Label::parse("nw-test1").is_ok());
        assert!(Label::parse("Büro Netz (prod)").is_ok());
        for bad in [
            "",
            "a\nb",
            "x\u{1b}[31m",
            "rtl\u{202e}txt",
            "zero\u{200b}width",
        ] {
            assert!(Label::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Label::parse(&"n".repeat(65)).is_err());
        assert_eq!(
            DomainName::parse("example.com.").unwrap().as_str(),
            "example.com"
        );
        for bad in ["", ".", "a..b", "-a.b", "a b", "~example.com", "x\n[Route]"] {
            assert!(DomainName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
