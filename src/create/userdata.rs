//! The user-data `create` gives a server: a cloud-config document with the `hcloud_nixos`
//! section (token and reference) and the server's SSH host key (cloud-init's `ssh_keys`),
//! merged with the user's own user-data, checked with the agent's own parser, and held under
//! Hetzner's size limit.

use std::io::Write as _;

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::agent::userdata::{self, MAX_RAW, SECTION};
use crate::plumbing::secret::Secret;

/// What goes into a server's user-data besides the user's own.
pub(crate) struct Ours<'a> {
    pub token: &'a Secret,
    pub flake: &'a str,
    /// The host key's private half (OpenSSH format) and its public line.
    pub host_key_private: &'a Secret,
    pub host_key_public: &'a str,
}

/// The cloud-config mapping of ours.
fn our_mapping(ours: &Ours<'_>) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert(
        SECTION.into(),
        json!({ "flakehub_token": ours.token.expose(), "flake": ours.flake }),
    );
    map.insert(
        "ssh_keys".into(),
        json!({
            "ed25519_private": ours.host_key_private.expose(),
            "ed25519_public": ours.host_key_public,
        }),
    );
    map
}

/// A cloud-config document: JSON is YAML, so the mapping is written as JSON (every string
/// escaped, no indentation to get wrong) behind cloud-init's first line.
fn cloud_config(map: Map<String, Value>) -> String {
    format!(
        "#cloud-config\n{}\n",
        serde_json::to_string_pretty(&Value::Object(map)).unwrap_or_default()
    )
}

/// Builds the user-data: ours alone, ours merged into the user's cloud-config, or ours beside
/// the user's script or MIME document in a MIME multipart. Checked with the agent's parser;
/// gzip and base64 when it would be over 32 KiB. Errors are one line and never show a secret.
pub(crate) fn build(ours: &Ours<'_>, theirs: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let text = match theirs {
        None => cloud_config(our_mapping(ours)),
        Some(raw) => combine(ours, raw)?,
    };
    let raw = fit(text.into_bytes())?;
    check(&raw, ours)?;
    Ok(raw)
}

fn combine(ours: &Ours<'_>, raw: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(raw).map_err(|_| {
        "--userdata: not text; give it as plain text (cloud-config, a script or MIME), create encodes it itself".to_string()
    })?;
    let first = text.lines().next().unwrap_or_default().trim_end();
    if first == "#cloud-config" {
        let theirs: Value = serde_saphyr::from_str(text).map_err(|e| {
            format!(
                "--userdata: not a YAML document: {}",
                one_line(&e.to_string())
            )
        })?;
        let mut map = match theirs {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            _ => return Err("--userdata: a cloud-config document must be a mapping".into()),
        };
        if map.contains_key(SECTION) {
            return Err(format!(
                "--userdata: it has a {SECTION} section of its own; give --flake and the token to create, or leave --userdata out"
            ));
        }
        if map.contains_key("ssh_keys") {
            return Err(
                "--userdata: it has ssh_keys of its own; create makes the server's host key so that it knows it before the first connection".into(),
            );
        }
        map.extend(our_mapping(ours));
        return Ok(cloud_config(map));
    }
    let kind = if first.starts_with("#!") {
        "text/x-shellscript"
    } else if text.starts_with("Content-Type:") || text.starts_with("MIME-Version:") {
        "multipart/mixed"
    } else if first.starts_with("#include") {
        "text/x-include-url"
    } else if first.starts_with("#cloud-boothook") {
        "text/cloud-boothook"
    } else {
        return Err(
            "--userdata: not a format create can combine with its own (cloud-config, a #! script, #include, #cloud-boothook or MIME multipart); give it as plain text".into(),
        );
    };
    Ok(multipart(&cloud_config(our_mapping(ours)), kind, text))
}

/// Two parts: ours, then theirs.
fn multipart(ours: &str, their_kind: &str, theirs: &str) -> String {
    let boundary = "hcloud-nixos-create-part";
    let theirs = if their_kind == "multipart/mixed" {
        // A MIME document brings its own headers.
        theirs.to_string()
    } else {
        format!("Content-Type: {their_kind}\n\n{theirs}")
    };
    format!(
        "Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n\
         --{boundary}\nContent-Type: text/cloud-config\n\n{ours}\n\
         --{boundary}\n{theirs}\n\
         --{boundary}--\n"
    )
}

/// The agent must read its section from this user-data, without a problem.
fn check(raw: &[u8], ours: &Ours<'_>) -> Result<(), String> {
    let data = userdata::parse(raw);
    if let Some(problem) = data.problems.first() {
        return Err(format!("the user-data create made is refused: {problem}"));
    }
    if data.host_key.as_ref().map(|k| k.public_line()) != Some(ours.host_key_public.trim()) {
        return Err(
            "the user-data create made has no host key the boot step reads (a bug in hcloud-nixos)"
                .into(),
        );
    }
    match data.settings.as_ref().and_then(|s| s.flake.as_deref()) {
        Some(flake) if flake == ours.flake => Ok(()),
        _ => Err(format!(
            "the user-data create made has no {SECTION}.flake the agent reads (a bug in hcloud-nixos)"
        )),
    }
}

/// Hetzner takes at most 32 KiB: over that, gzip and base64 (which the agent and cloud-init
/// read); still over, an error.
fn fit(raw: Vec<u8>) -> Result<Vec<u8>, String> {
    if raw.len() <= MAX_RAW {
        return Ok(raw);
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let packed = gz
        .write_all(&raw)
        .and_then(|()| gz.finish())
        .map_err(|e| format!("cannot compress the user-data: {e}"))?;
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(packed)
        .into_bytes();
    if encoded.len() > MAX_RAW {
        return Err(format!(
            "the user-data is {} bytes, {} compressed; Hetzner takes at most 32 KiB: shorten --userdata",
            raw.len(),
            encoded.len()
        ));
    }
    Ok(encoded)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAKE: &str = "my-org/infra/0.1#nixosConfigurations.web";
    const TOKEN: &str = "flakehub1_createTestToken_0123456789";
    fn with<T>(f: impl FnOnce(&Ours<'_>) -> T) -> T {
        let token = Secret::new(TOKEN);
        let key = super::super::hostkey::HostKey::generate("web-1").unwrap();
        f(&Ours {
            token: &token,
            flake: FLAKE,
            host_key_private: &key.private,
            host_key_public: &key.public,
        })
    }

    fn parsed(raw: &[u8]) -> userdata::UserData {
        let data = userdata::parse(raw);
        assert!(data.problems.is_empty(), "{:?}", data.problems);
        data
    }

    #[test]
    fn ours_alone_is_cloud_config_the_agent_reads() {
        let raw = with(|o| build(o, None)).unwrap();
        let text = String::from_utf8(raw.clone()).unwrap();
        assert!(text.starts_with("#cloud-config\n"), "{text}");
        let data = parsed(&raw);
        let settings = data.settings.unwrap();
        assert_eq!(settings.flake.as_deref(), Some(FLAKE));
        assert_eq!(settings.flakehub_token.unwrap().expose(), TOKEN);
        // The host key is there for the boot step, as cloud-init has it, and the boot step's
        // parser reads it.
        let doc: Value = serde_saphyr::from_str(&text).unwrap();
        let public = doc["ssh_keys"]["ed25519_public"].as_str().unwrap();
        assert!(public.starts_with("ssh-ed25519 ") && public.ends_with(" root@web-1"));
        assert_eq!(data.host_key.unwrap().public_line(), public);
    }

    #[test]
    fn a_cloud_config_of_the_user_is_merged() {
        let theirs = b"#cloud-config\npackages: [htop]\nruncmd:\n  - [touch, /root/x]\n";
        let raw = with(|o| build(o, Some(theirs))).unwrap();
        let data = parsed(&raw);
        assert!(data.settings.is_some());
        assert_eq!(data.other_keys, ["packages", "runcmd"]);
        let doc: Value = serde_saphyr::from_str(std::str::from_utf8(&raw).unwrap()).unwrap();
        assert_eq!(doc["packages"][0], "htop");
    }

    #[test]
    fn a_script_or_mime_of_the_user_goes_beside_ours() {
        let raw = with(|o| build(o, Some(b"#!/bin/sh\necho hello\n"))).unwrap();
        let data = parsed(&raw);
        assert!(data.settings.is_some());
        assert_eq!(data.other_parts.len(), 1, "{:?}", data.other_parts);
        let text = String::from_utf8(raw).unwrap();
        assert!(text.contains("Content-Type: text/x-shellscript\n\n#!/bin/sh\necho hello"));
    }

    #[test]
    fn what_cannot_be_combined_is_refused_without_showing_secrets() {
        for (theirs, says) in [
            (
                &b"#cloud-config\nhcloud_nixos:\n  flake: a/b/1\n"[..],
                "has a hcloud_nixos section of its own",
            ),
            (b"#cloud-config\nssh_keys: {}\n", "has ssh_keys of its own"),
            (b"#cloud-config\n- a\n- list\n", "must be a mapping"),
            (b"H4sIAAAAAAAA", "not a format create can combine"),
            (&[0xff, 0xfe, 0x00][..], "not text"),
        ] {
            let e = with(|o| build(o, Some(theirs))).unwrap_err();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains(TOKEN) && !e.contains("PRIVATE KEY"), "{e}");
        }
    }

    #[test]
    fn large_user_data_is_compressed_and_too_large_is_refused() {
        let big = format!(
            "#cloud-config\nwrite_files:\n  - content: \"{}\"\n",
            "a".repeat(40_000)
        );
        let raw = with(|o| build(o, Some(big.as_bytes()))).unwrap();
        assert!(raw.len() <= MAX_RAW);
        assert!(
            parsed(&raw).settings.is_some(),
            "the agent reads it compressed"
        );
        let mut noise = String::from("#!/bin/sh\n");
        let mut x: u64 = 1;
        for _ in 0..60_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            noise.push(char::from(b'a' + (x >> 59) as u8));
        }
        let e = with(|o| build(o, Some(noise.as_bytes()))).unwrap_err();
        assert!(e.contains("Hetzner takes at most 32 KiB"), "{e}");
    }
}
