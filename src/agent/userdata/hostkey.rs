//! The server's SSH host key from the user-data (cloud-init's `ssh_keys`), checked before it is used.
//!
//! `hcloud-nixos create` generates an ed25519 host key for each server and passes it in the
//! user-data as `ssh_keys: {ed25519_private, ed25519_public}`, so that it knows the key before the
//! first connection. The boot step installs it before sshd starts. The private half is a secret:
//! it never reaches a message, and an error says what is wrong with the key without quoting it.

use base64::Engine as _;
use serde_json::Value;

use crate::plumbing::secret::Secret;

/// The largest private key accepted (an ed25519 key in OpenSSH's format is about 400 bytes).
const MAX_PRIVATE: usize = 8 * 1024;
/// The largest public key line accepted.
const MAX_PUBLIC: usize = 1024;

const BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
const END: &str = "-----END OPENSSH PRIVATE KEY-----";
const KEY_TYPE: &str = "ssh-ed25519";

/// An ed25519 host key whose two halves belong together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostKey {
    /// The private key in OpenSSH's format, ending with a newline.
    pub(crate) private: Secret,
    /// `ssh-ed25519 <base64> [comment]`, one line ending with a newline.
    pub(crate) public: String,
}

impl HostKey {
    /// Checks a pair: an unencrypted OpenSSH private key holding one ed25519 key, and a public
    /// line of the same key. The error is one line and never quotes the private key.
    pub(crate) fn new(private: &str, public: &str) -> Result<HostKey, String> {
        let public = public.trim();
        let public_blob = public_blob(public)?;
        let private = private.trim();
        let private_blob = private_public_blob(private)?;
        if private_blob != public_blob {
            return Err(
                "ed25519_public is not the public half of ed25519_private; give the pair as generated"
                    .into(),
            );
        }
        Ok(HostKey {
            private: Secret::new(format!("{private}\n")),
            public: format!("{public}\n"),
        })
    }

    /// The public line without its newline (for messages).
    pub(crate) fn public_line(&self) -> &str {
        self.public.trim_end()
    }
}

/// Reads cloud-init's `ssh_keys` mapping. `Ok(None)` when it holds no ed25519 pair; other key
/// types are reported as ignored (only ed25519 is installed).
pub(super) fn from_ssh_keys(value: &Value, problems: &mut Vec<String>) -> Option<HostKey> {
    let Value::Object(map) = value else {
        problems.push(
            "ssh_keys: must be a mapping (ed25519_private, ed25519_public); no host key is installed"
                .into(),
        );
        return None;
    };
    for key in map.keys() {
        if key != "ed25519_private" && key != "ed25519_public" {
            problems.push(format!(
                "ssh_keys: {} is ignored; hcloud-nixos installs an ed25519 host key only",
                super::shown_key(key)
            ));
        }
    }
    let text = |name: &str| match map.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(format!("ssh_keys: {name} must be a string")),
    };
    let pair = (text("ed25519_private"), text("ed25519_public"));
    let result = match pair {
        (Err(e), _) | (_, Err(e)) => Err(e),
        (Ok(None), Ok(None)) => return None,
        (Ok(Some(_)), Ok(None)) => Err("ssh_keys: ed25519_private without ed25519_public".into()),
        (Ok(None), Ok(Some(_))) => Err("ssh_keys: ed25519_public without ed25519_private".into()),
        (Ok(Some(private)), Ok(Some(public))) => {
            HostKey::new(private, public).map_err(|e| format!("ssh_keys: {e}"))
        }
    };
    match result {
        Ok(key) => Some(key),
        Err(e) => {
            problems.push(format!("{e}; no host key is installed"));
            None
        }
    }
}

/// The key blob of a public key line (`ssh-ed25519 <base64> [comment]`).
fn public_blob(line: &str) -> Result<Vec<u8>, String> {
    if line.len() > MAX_PUBLIC || line.contains(['\n', '\r']) {
        return Err("ed25519_public must be one line of at most 1 KiB".into());
    }
    let mut words = line.split_ascii_whitespace();
    if words.next() != Some(KEY_TYPE) {
        return Err("ed25519_public must start with ssh-ed25519".into());
    }
    let blob = words
        .next()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .ok_or("ed25519_public: the key after ssh-ed25519 is not base64")?;
    check_blob(&blob).map_err(|e| format!("ed25519_public: {e}"))?;
    Ok(blob)
}

/// An ed25519 key blob: the string `ssh-ed25519` and a 32-byte key.
fn check_blob(blob: &[u8]) -> Result<(), String> {
    let mut r = Reader(blob);
    let ok = r.string() == Some(KEY_TYPE.as_bytes())
        && r.string().is_some_and(|k| k.len() == 32)
        && r.0.is_empty();
    ok.then_some(())
        .ok_or_else(|| "not an ed25519 public key".to_string())
}

/// The public key blob inside an OpenSSH private key (`openssh-key-v1`, unencrypted, one key).
fn private_public_blob(text: &str) -> Result<Vec<u8>, String> {
    if text.len() > MAX_PRIVATE {
        return Err("ed25519_private is larger than 8 KiB; it is not an ed25519 key".into());
    }
    let body = text
        .strip_prefix(BEGIN)
        .and_then(|rest| rest.strip_suffix(END))
        .ok_or("ed25519_private must be a private key in OpenSSH's format (-----BEGIN OPENSSH PRIVATE KEY-----)")?;
    let compact: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let data = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|_| "ed25519_private: the text between its first and last line is not base64")?;
    let mut r = Reader(&data);
    let damaged = || "ed25519_private: not a complete OpenSSH private key".to_string();
    if r.take(15) != Some(b"openssh-key-v1\0".as_slice()) {
        return Err(damaged());
    }
    let cipher = r.string().ok_or_else(damaged)?;
    if cipher != b"none" {
        return Err(
            "ed25519_private is encrypted; sshd cannot read it at boot, give it without a passphrase"
                .into(),
        );
    }
    let _kdf = r.string().ok_or_else(damaged)?;
    let _kdf_options = r.string().ok_or_else(damaged)?;
    if r.u32() != Some(1) {
        return Err("ed25519_private must hold exactly one key".into());
    }
    let blob = r.string().ok_or_else(damaged)?;
    check_blob(blob).map_err(|e| format!("ed25519_private: {e}"))?;
    Ok(blob.to_vec())
}

/// Reads SSH wire-format fields (RFC 4251: uint32 and length-prefixed strings).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        self.take(n)
    }
}

/// A fresh pair from OpenSSH's own `ssh-keygen`, (private, public line), for tests: no key is
/// kept in the source tree.
#[cfg(test)]
pub(crate) fn generated_pair() -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "root@web-1", "-f"])
        .arg(&file)
        .output()
        .expect("ssh-keygen (Debian: openssh-client) runs");
    assert!(out.status.success(), "{out:?}");
    let private = std::fs::read_to_string(&file).unwrap();
    let public = std::fs::read_to_string(file.with_extension("pub")).unwrap();
    (private, public.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::generated_pair as pair;

    const OTHER_PUBLIC: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA other";

    #[test]
    fn a_generated_pair_is_accepted_as_it_is() {
        let (private, public) = pair();
        let key = HostKey::new(&private, &format!("{public}\n")).unwrap();
        assert_eq!(key.private.expose(), private);
        assert_eq!(key.public, format!("{public}\n"));
        assert_eq!(key.public_line(), public);
    }

    #[test]
    fn halves_of_different_keys_are_refused() {
        let (private, _) = pair();
        let e = HostKey::new(&private, OTHER_PUBLIC).unwrap_err();
        assert!(e.contains("not the public half"), "{e}");
    }

    #[test]
    fn errors_never_quote_the_private_key() {
        let (private, public) = pair();
        let damaged = private.replacen("b3BlbnNz", "b3BlbnNy", 1);
        let cases = [
            damaged.as_str(),
            &private[..200],
            "-----BEGIN OPENSSH PRIVATE KEY-----\nnot base64!\n-----END OPENSSH PRIVATE KEY-----",
            "ssh-ed25519 AAAA",
        ];
        for bad in cases {
            let e = HostKey::new(bad, &public).unwrap_err();
            assert!(!e.contains("b3BlbnNz") && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn public_lines_are_checked() {
        let (private, _) = pair();
        for public in [
            "ssh-rsa AAAAB3NzaC1yc2E",
            "ssh-ed25519 !!!",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5",
            "ssh-ed25519 AAAA\nssh-ed25519 AAAA",
        ] {
            assert!(HostKey::new(&private, public).is_err(), "{public}");
        }
    }

    #[test]
    fn ssh_keys_mapping() {
        let (private, public) = pair();
        let mut problems = Vec::new();
        let v = serde_json::json!({"ed25519_private": private, "ed25519_public": public, "rsa_private": "x"});
        assert!(from_ssh_keys(&v, &mut problems).is_some());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("rsa_private is ignored"));
        problems.clear();
        let v = serde_json::json!({ "ed25519_private": private });
        assert!(from_ssh_keys(&v, &mut problems).is_none());
        assert!(
            problems[0].contains("without ed25519_public"),
            "{problems:?}"
        );
        problems.clear();
        assert!(from_ssh_keys(&serde_json::json!([1]), &mut problems).is_none());
        assert!(problems[0].contains("must be a mapping"));
    }
}
