//! User-data as real tools render it: documents, encodings, MIME. The section's values are
//! tested in [`section`].

use std::io::Write as _;
use std::time::Duration;

use super::*;
use crate::agent::config::Operation;

mod section;

const TOKEN: &str = "flakehub1_s3cr3tT0kenValue_0123456789abcdef";

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/hetzner-metadata/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn b64(data: &[u8]) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .encode(data)
        .into_bytes()
}

/// base64 wrapped at 76 columns, as `base64` and MIME encoders write it.
fn b64_wrapped(data: &[u8]) -> Vec<u8> {
    let one = String::from_utf8(b64(data)).unwrap();
    let lines: Vec<&str> = one
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!("{}\n", lines.join("\n")).into_bytes()
}

fn full_section() -> String {
    format!(
        "#cloud-config\n\
         package_update: true\n\
         hcloud_nixos:\n  \
           flakehub_token: {TOKEN}\n  \
           flake: my-org/infra/0.1#nixosConfigurations.web\n  \
           poll_interval: 5m\n  \
           operation: boot\n\
         runcmd:\n\
         - [touch, /root/cloud-init-worked]\n"
    )
}

/// What the agent makes of the section: merged under an empty configuration file, validated.
fn effective(settings: &UserSettings) -> crate::agent::config::Settings {
    let no_file = |_: &Path| Err(std::io::Error::from(std::io::ErrorKind::NotFound));
    crate::agent::config::resolve(&Default::default(), Some(settings), no_file)
        .expect("valid user-data settings")
}

fn assert_full(data: &UserData) {
    assert_eq!(data.problems, Vec::<String>::new());
    let s = data.settings.as_ref().expect("the hcloud_nixos section");
    assert_eq!(s.flakehub_token.as_ref().unwrap().expose(), TOKEN);
    assert_eq!(
        s.flake.as_ref().unwrap().to_string(),
        "my-org/infra/0.1#nixosConfigurations.web"
    );
    assert_eq!(s.poll_interval.as_deref(), Some("5m"));
    assert_eq!(s.operation, Some(Operation::Boot));
    assert_eq!(data.other_keys, ["package_update", "runcmd"]);
    let effective = effective(s);
    assert_eq!(effective.poll_interval, Duration::from_secs(300));
    assert_eq!(effective.flake.unwrap().flake, "infra");
    assert_eq!(effective.token.unwrap().secret().expose(), TOKEN);
}

fn problems_of(section_body: &str) -> (UserData, Vec<String>) {
    let doc = format!("#cloud-config\nhcloud_nixos:\n{section_body}");
    let data = parse(doc.as_bytes());
    let problems = data.problems.clone();
    for p in &problems {
        assert!(!p.contains('\n'), "one line each: {p:?}");
    }
    (data, problems)
}

/// The only problem, which must start with `prefix` and contain `needle`.
fn one_problem(section_body: &str, prefix: &str, needle: &str) -> UserData {
    let (data, problems) = problems_of(section_body);
    assert_eq!(problems.len(), 1, "{section_body:?}: {problems:?}");
    assert!(
        problems[0].starts_with(prefix) && problems[0].contains(needle),
        "{section_body:?}: {:?} should start with {prefix:?} and mention {needle:?}",
        problems[0]
    );
    data
}

// --- Documents without our section -----------------------------------------------------------

#[test]
fn the_fixture_has_no_section_of_ours() {
    let data = parse(&fixture("userdata.cloud-config-example.yaml"));
    assert_eq!(data.settings, None);
    assert_eq!(data.problems, Vec::<String>::new());
    assert_eq!(data.other_keys, ["runcmd"]);
    assert!(describe(&data).contains("No hcloud_nixos section"));
    assert!(describe(&data).contains("runcmd"));
}

#[test]
fn no_user_data_is_not_a_problem() {
    for raw in [
        &b""[..],
        b"\n",
        b"  \r\n\t",
        b"#cloud-config\n",
        b"#cloud-config\n# nothing\n",
    ] {
        let data = parse(raw);
        assert_eq!(data, UserData::default(), "{raw:?}");
    }
}

#[test]
fn an_empty_section_is_present_but_sets_nothing() {
    let data = parse(b"#cloud-config\nhcloud_nixos:\n");
    assert_eq!(data.problems, Vec::<String>::new());
    assert_eq!(data.settings, Some(UserSettings::default()));
    let text = describe(&data);
    assert!(
        text.contains("flake:") && text.contains("(not set)"),
        "{text}"
    );
}

#[test]
fn other_cloud_init_formats_are_left_alone() {
    let data = parse(b"#!/bin/sh\necho hello > /root/hello\n");
    assert_eq!(data.settings, None);
    assert_eq!(data.problems, Vec::<String>::new());
    assert_eq!(data.other_parts, ["user-data (text/x-shellscript)"]);
    let data = parse(b"#include\nhttps://example.com/config.yaml\n");
    assert_eq!(data.other_parts, ["user-data (text/x-include-url)"]);
}

#[test]
fn a_section_where_it_is_not_read_is_a_problem() {
    let data = parse(b"## template: jinja\n#cloud-config\nhcloud_nixos:\n  flake: a/b/*\n");
    assert_eq!(data.settings, None);
    assert_eq!(data.problems.len(), 1, "{:?}", data.problems);
    assert!(data.problems[0].contains("reads only cloud-config"));
}

// --- Encodings --------------------------------------------------------------------------------

#[test]
fn with_and_without_the_cloud_config_line() {
    let doc = full_section();
    assert_full(&parse(doc.as_bytes()));
    let without = doc.strip_prefix("#cloud-config\n").unwrap();
    assert_full(&parse(without.as_bytes()));
    // Windows line ends, a byte order mark, a header with trailing spaces.
    let crlf = doc.replace('\n', "\r\n");
    assert_full(&parse(crlf.as_bytes()));
    assert_full(&parse(format!("\u{feff}{doc}").as_bytes()));
    assert_full(&parse(
        doc.replacen("#cloud-config", "#cloud-config  ", 1)
            .as_bytes(),
    ));
}

#[test]
fn base64_gzip_and_base64_of_gzip() {
    let doc = full_section().into_bytes();
    for (name, raw) in [
        ("base64", b64(&doc)),
        ("base64 wrapped", b64_wrapped(&doc)),
        ("gzip", gzip(&doc)),
        ("base64 of gzip", b64(&gzip(&doc))),
        ("base64 of gzip, wrapped", b64_wrapped(&gzip(&doc))),
        ("base64 of base64", b64(&b64(&doc))),
    ] {
        let data = parse(&raw);
        assert_eq!(data.problems, Vec::<String>::new(), "{name}");
        assert_full(&data);
        assert_eq!(decode(&raw).unwrap(), doc, "{name}");
    }
    // Unpadded base64 too.
    let unpadded = String::from_utf8(b64(&doc)).unwrap();
    assert_full(&parse(unpadded.trim_end_matches('=').as_bytes()));
}

#[test]
fn plain_text_is_not_mistaken_for_base64() {
    // Words of base64 characters: decoding them gives no text, so they stay as they are.
    assert_eq!(decode(b"abcd").unwrap(), b"abcd");
    assert_eq!(decode(b"hcloud").unwrap(), b"hcloud");
}

#[test]
fn gzip_bombs_are_refused() {
    // 64 MiB of zeroes compress to about 64 KiB: too big raw. 2 MiB compress to ~2 KiB.
    let bomb = gzip(&vec![b'a'; 2 * MAX_DECODED]);
    assert!(bomb.len() < MAX_RAW);
    assert_eq!(decode(&bomb), Err(DecodeError::DecompressedTooLarge));
    assert_eq!(decode(&b64(&bomb)), Err(DecodeError::DecompressedTooLarge));
    let data = parse(&b64(&bomb));
    assert_eq!(data.settings, None);
    assert_eq!(data.problems.len(), 1);
    assert!(
        data.problems[0].contains("gzip bomb"),
        "{:?}",
        data.problems
    );
    // A bomb nested in layers: gzip of (base64 of gzip bomb) is small, still refused.
    let nested = gzip(&b64(&gzip(&vec![0u8; 4 * MAX_DECODED])));
    assert!(nested.len() < MAX_RAW);
    assert_eq!(decode(&nested), Err(DecodeError::DecompressedTooLarge));
    // Exactly the limit is fine.
    let mut at_limit = b"#cloud-config\n".to_vec();
    at_limit.resize(MAX_DECODED, b'\n');
    assert_eq!(decode(&gzip(&at_limit)).unwrap().len(), MAX_DECODED);
}

#[test]
fn decoding_faults() {
    assert_eq!(
        decode(&vec![b'\n'; MAX_RAW + 1]),
        Err(DecodeError::TooLarge(MAX_RAW + 1))
    );
    let mut cut = gzip(full_section().as_bytes());
    cut.truncate(cut.len() / 2);
    assert!(matches!(decode(&cut), Err(DecodeError::Gzip(_))));
    assert_eq!(
        decode(&gzip(&[0xff, 0xfe, 0x00])),
        Err(DecodeError::NotText)
    );
    assert_eq!(decode(&[0xc3, 0x28]), Err(DecodeError::NotText));
    let mut layered = full_section().into_bytes();
    for _ in 0..6 {
        layered = gzip(&layered);
    }
    assert_eq!(decode(&layered), Err(DecodeError::TooManyLayers));
    for raw in [cut, vec![0xc3, 0x28], layered] {
        let data = parse(&raw);
        assert_eq!(data.settings, None);
        assert_eq!(data.problems.len(), 1, "{:?}", data.problems);
    }
}

// --- MIME multipart ---------------------------------------------------------------------------

/// What Terraform's `cloudinit_config` renders (`gzip = false, base64_encode = false`): the
/// first header line ends in LF only, the rest in CRLF; Go's multipart writer sorts the part
/// headers and spells `Mime-Version`. Here one part is 7bit, one base64 (as written by hand or by
/// other tools), plus a shell script.
fn terraform_multipart(cloud_config: &str) -> String {
    let encoded = String::from_utf8(b64_wrapped(cloud_config.as_bytes()))
        .unwrap()
        .replace('\n', "\r\n");
    format!(
        "Content-Type: multipart/mixed; boundary=\"MIMEBOUNDARY\"\n\
         MIME-Version: 1.0\r\n\
         \r\n\
         --MIMEBOUNDARY\r\n\
         Content-Disposition: attachment; filename=\"base.yaml\"\r\n\
         Content-Transfer-Encoding: 7bit\r\n\
         Content-Type: text/cloud-config\r\n\
         Mime-Version: 1.0\r\n\
         X-Merge-Type: list(append)+dict(no_replace,recurse_list)+str()\r\n\
         \r\n\
         #cloud-config\r\n\
         packages:\r\n\
         - htop\r\n\
         ssh_pwauth: false\r\n\
         \r\n\
         --MIMEBOUNDARY\r\n\
         Content-Disposition: attachment; filename=\"hcloud-nixos.yaml\"\r\n\
         Content-Transfer-Encoding: base64\r\n\
         Content-Type: text/cloud-config\r\n\
         Mime-Version: 1.0\r\n\
         \r\n\
         {encoded}\
         --MIMEBOUNDARY\r\n\
         Content-Disposition: attachment; filename=\"hello.sh\"\r\n\
         Content-Transfer-Encoding: 7bit\r\n\
         Content-Type: text/x-shellscript\r\n\
         Mime-Version: 1.0\r\n\
         \r\n\
         #!/bin/bash\r\n\
         echo hello > /root/hello\r\n\
         \r\n\
         --MIMEBOUNDARY--\r\n"
    )
}

#[test]
fn terraform_cloudinit_config() {
    let mime = terraform_multipart(&full_section());
    let check = |raw: &[u8], name: &str| {
        let data = parse(raw);
        assert_eq!(data.problems, Vec::<String>::new(), "{name}");
        let s = data.settings.as_ref().expect(name);
        assert_eq!(s.flakehub_token.as_ref().unwrap().expose(), TOKEN);
        assert_eq!(effective(s).flake.unwrap().org, "my-org");
        assert_eq!(s.operation, Some(Operation::Boot));
        assert_eq!(
            data.other_keys,
            ["packages", "ssh_pwauth", "package_update", "runcmd"],
            "{name}"
        );
        assert_eq!(
            data.other_parts,
            ["user-data part 3 (text/x-shellscript)"],
            "{name}"
        );
    };
    check(mime.as_bytes(), "plain");
    // base64_encode = true
    check(&b64(mime.as_bytes()), "base64");
    // gzip = true, base64_encode = true (the provider's defaults)
    check(&b64(&gzip(mime.as_bytes())), "gzip+base64");
    // The section in the 7bit part instead.
    let seven_bit = mime.replace(
        "ssh_pwauth: false\r\n",
        &format!(
            "ssh_pwauth: false\r\nhcloud_nixos:\r\n  flake: a/b/*\r\n  flakehub_token: {TOKEN}\r\n"
        ),
    );
    let seven_bit = seven_bit.replace(
        &String::from_utf8(b64_wrapped(full_section().as_bytes()))
            .unwrap()
            .replace('\n', "\r\n"),
        &String::from_utf8(b64_wrapped(b"#cloud-config\nruncmd: []\n"))
            .unwrap()
            .replace('\n', "\r\n"),
    );
    let data = parse(seven_bit.as_bytes());
    assert_eq!(data.problems, Vec::<String>::new());
    assert_eq!(data.settings.unwrap().flake.unwrap().to_string(), "a/b/*");
}

#[test]
fn terraform_exact_rendering_with_a_text_plain_part() {
    // A part without content_type is text/plain; cloud-init goes by its first line.
    let body = full_section().replace('\n', "\r\n");
    let mime = format!(
        "Content-Type: multipart/mixed; boundary=\"MIMEBOUNDARY\"\nMIME-Version: 1.0\r\n\r\n\
         --MIMEBOUNDARY\r\nContent-Transfer-Encoding: 7bit\r\nContent-Type: text/plain\r\n\
         Mime-Version: 1.0\r\n\r\n{body}\r\n--MIMEBOUNDARY--\r\n"
    );
    assert_full(&parse(&b64(&gzip(mime.as_bytes()))));
}

#[test]
fn hcloud_cli_several_user_data_files() {
    // `hcloud server create --user-data-from-file a --user-data-from-file b`: a random
    // boundary, parts base64 on one line, MIME-Version first.
    let part = |ctype: &str, content: &str| {
        format!(
            "--3f1b2c4d5e6f\r\nContent-Transfer-Encoding: base64\r\nContent-Type: {ctype}\r\n\r\n{}\r\n",
            String::from_utf8(b64(content.as_bytes())).unwrap()
        )
    };
    let mime = format!(
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=3f1b2c4d5e6f\r\n\r\n{}{}--3f1b2c4d5e6f--\r\n",
        part("text/x-shellscript", "#!/bin/sh\ntrue\n"),
        part("text/cloud-config", &full_section()),
    );
    let data = parse(mime.as_bytes());
    assert_full(&data);
    assert_eq!(data.other_parts, ["user-data part 1 (text/x-shellscript)"]);
}

#[test]
fn many_small_gzip_parts_share_one_limit() {
    // Each part decompresses to 256 KiB of comment lines: five of them exceed 1 MiB together,
    // while the whole archive is small.
    let filler = format!("#cloud-config\n{}", "#\n".repeat(128 * 1024));
    let part = format!(
        "--B\r\nContent-Type: application/x-gzip\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n",
        String::from_utf8(b64(&gzip(filler.as_bytes()))).unwrap()
    );
    let mime = format!(
        "Content-Type: multipart/mixed; boundary=\"B\"\r\nMIME-Version: 1.0\r\n\r\n{}--B--\r\n",
        part.repeat(6)
    );
    let raw = b64(&gzip(mime.as_bytes()));
    assert!(raw.len() < MAX_RAW, "{}", raw.len());
    let data = parse(&raw);
    assert_eq!(data.problems.len(), 1, "{:?}", data.problems);
    assert!(
        data.problems[0].starts_with("user-data part 4 (application/x-gzip): ")
            && data.problems[0].contains("gzip bomb"),
        "{:?}",
        data.problems
    );
    // Three such parts are fine.
    let mime = mime.replacen(&part, "", 3);
    let data = parse(mime.as_bytes());
    assert_eq!(data.problems, Vec::<String>::new());
}

#[test]
fn a_cloud_config_that_quotes_mime_headers_is_still_cloud_config() {
    let doc = format!(
        "{}write_files:\n- path: /etc/mail/template\n  content: |\n    MIME-Version: 1.0\n    Content-Type: text/plain\n",
        full_section()
    );
    let data = parse(doc.as_bytes());
    assert_eq!(data.problems, Vec::<String>::new());
    assert!(data.settings.is_some());
    assert!(data.other_keys.contains(&"write_files".to_string()));
}

#[test]
fn several_cloud_config_parts_with_the_section() {
    let part =
        |content: &str| format!("--B\r\nContent-Type: text/cloud-config\r\n\r\n{content}\r\n");
    let mime = format!(
        "Content-Type: multipart/mixed; boundary=\"B\"\r\nMIME-Version: 1.0\r\n\r\n{}{}--B--\r\n",
        part("#cloud-config\nhcloud_nixos:\n  flake: a/first/*\n"),
        part("#cloud-config\nhcloud_nixos:\n  flake: a/second/*\n"),
    );
    let data = parse(mime.as_bytes());
    assert_eq!(
        effective(&data.settings.unwrap()).flake.unwrap().flake,
        "first"
    );
    assert_eq!(data.problems.len(), 1, "{:?}", data.problems);
    assert!(data.problems[0].contains("appears in 2 cloud-config parts"));
}

#[test]
fn a_broken_part_does_not_hide_the_others() {
    let mime = "Content-Type: multipart/mixed; boundary=\"B\"\r\nMIME-Version: 1.0\r\n\r\n\
         --B\r\nContent-Type: text/cloud-config\r\n\r\n#cloud-config\nruncmd: [unclosed\r\n\
         --B\r\nContent-Type: text/cloud-config\r\n\r\n#cloud-config\nhcloud_nixos:\n  flake: a/b/*\r\n\
         --B--\r\n";
    let data = parse(mime.as_bytes());
    assert_eq!(data.settings.unwrap().flake.unwrap().to_string(), "a/b/*");
    assert_eq!(data.problems.len(), 1, "{:?}", data.problems);
    assert!(
        data.problems[0].starts_with("user-data part 1 (text/cloud-config): not valid YAML"),
        "{:?}",
        data.problems
    );
}

#[test]
fn text_from_the_document_reaches_messages_on_one_line() {
    // Keys, MIME types and parser messages go to the log: a key with a newline must not become
    // a log line of its own, nor a terminal escape reach a terminal.
    let doc = "#cloud-config\n\"evil\\nWARN forged line\": 1\n\"\\e[31mred\": 2\nhcloud_nixos:\n  \"flake\\n\": x\n";
    let data = parse(doc.as_bytes());
    let all: Vec<&String> = data
        .other_keys
        .iter()
        .chain(&data.problems)
        .chain(&data.other_parts)
        .collect();
    assert!(data.other_keys.len() == 2, "{data:?}");
    for line in all {
        assert!(
            !line.chars().any(|c| c.is_control()),
            "a control character in {line:?}"
        );
    }
    let mime = terraform_multipart("#cloud-config\nhcloud_nixos: {}\n")
        .replace("text/x-shellscript", "text/x-\u{1b}[2Jshellscript");
    let data = parse(mime.as_bytes());
    for line in data.other_parts.iter().chain(&data.problems) {
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
    }
}

#[test]
fn a_key_that_is_no_typo_of_ours_is_not_shown() {
    // A mangled line can make a token (even without its prefix) a key.
    let doc = format!(
        "#cloud-config\nlakehub1_{secret}: 1\nhcloud_nixos:\n  lakehub1_{secret}: x\n  flak: a/b/0.1\n",
        secret = "s3cr3tT0kenValue_0123456789abcdef"
    );
    let data = parse(doc.as_bytes());
    assert_eq!(data.other_keys, ["(a key of 42 characters)"]);
    assert!(
        data.problems
            .iter()
            .any(|p| p.starts_with("hcloud_nixos.(a key of 42 characters): unknown key")),
        "{data:?}"
    );
    assert!(
        data.problems
            .iter()
            .any(|p| p.starts_with("hcloud_nixos.flak: unknown key (did you mean flake?)")),
        "{data:?}"
    );
    assert!(!format!("{data:?}").contains("s3cr3t"));
}

#[test]
fn a_value_holding_the_token_without_its_prefix_is_not_shown() {
    // Found by the long run of the parsers' property test: a mangled line put the token, its
    // first letter gone, into `flake`, whose error quotes the value.
    let doc = format!(
        "#cloud-config\nhcloud_nixos:\n  flakehub_token: {TOKEN}\n  flake: '{}'\n",
        &TOKEN[1..]
    );
    let data = parse(doc.as_bytes());
    assert!(
        data.problems
            .iter()
            .any(|p| p.starts_with("hcloud_nixos.flake:")),
        "{data:?}"
    );
    assert!(
        !format!("{:?}", data.problems).contains("s3cr3t"),
        "{data:?}"
    );
}

#[test]
fn a_value_that_may_be_a_token_is_shown_by_its_length() {
    // Found by the long run too: the token's line mangled into the flake line, no token left
    // to recognise. A value with a word long enough to be a token is not quoted.
    let doc =
        "#cloud-config\nhcloud_nixos:\n  flake: alakehub1_s3cr3tT0kenValue_0123456789abcdef\n";
    let data = parse(doc.as_bytes());
    assert_eq!(
        data.problems[0],
        "hcloud_nixos.flake: (a value of 43 characters) is not org/flake/version; expected org/flake/version[#attr], e.g. my-org/infra/0.1#nixosConfigurations.web"
    );
}

#[test]
fn a_line_separator_in_a_key_is_escaped() {
    // Found by the long run: a key of U+2028 alone was shown as it is (an empty-looking line).
    let data = parse("#cloud-config\n\u{2028}: 1\n".as_bytes());
    assert_eq!(data.other_keys, ["\\u{2028}"]);
}
