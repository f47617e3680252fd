//! User-data documents as the agent reads them from the metadata service: a cloud-config with an
//! `hcloud_nixos` section, in every encoding Hetzner passes through.

use std::fmt::Write as _;
use std::io::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Plain,
    Base64,
    Gzip,
    GzipBase64,
    /// MIME multipart (as Terraform's cloudinit_config renders it): a shell script part and the
    /// cloud-config part in base64.
    Mime,
    /// The MIME archive, gzipped and base64-encoded.
    MimeGzipBase64,
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn base64(data: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .encode(data)
        .into_bytes()
}

/// A cloud-config document with an `hcloud_nixos` section.
pub fn cloud_config(flake: &str, token: Option<&str>) -> String {
    let mut doc = String::from("#cloud-config\npackages: [htop]\nhcloud_nixos:\n");
    if let Some(t) = token {
        let _ = writeln!(doc, "  flakehub_token: {t}");
    }
    let _ = writeln!(doc, "  flake: {flake}");
    doc
}

/// `doc` in `encoding`.
pub fn encode(doc: &str, encoding: Encoding) -> Vec<u8> {
    let mime = || {
        let part = String::from_utf8(base64(doc.as_bytes())).unwrap();
        format!(
            "Content-Type: multipart/mixed; boundary=\"MIMEBOUNDARY\"\nMIME-Version: 1.0\n\n\
             --MIMEBOUNDARY\nContent-Transfer-Encoding: 7bit\nContent-Type: text/x-shellscript\n\
             Mime-Version: 1.0\n\n#!/bin/sh\necho hello\n\n\
             --MIMEBOUNDARY\nContent-Transfer-Encoding: base64\nContent-Type: text/cloud-config\n\
             Mime-Version: 1.0\n\n{part}\n--MIMEBOUNDARY--\n"
        )
    };
    match encoding {
        Encoding::Plain => doc.as_bytes().to_vec(),
        Encoding::Base64 => base64(doc.as_bytes()),
        Encoding::Gzip => gzip(doc.as_bytes()),
        Encoding::GzipBase64 => base64(&gzip(doc.as_bytes())),
        Encoding::Mime => mime().into_bytes(),
        Encoding::MimeGzipBase64 => base64(&gzip(mime().as_bytes())),
    }
}
