//! `hcloud-nixos upload` and `hcloud-nixos cleanup`: turn a disk image into a Hetzner Cloud snapshot through a temporary server in rescue mode.

pub(crate) mod api;
mod cleanup;
pub(crate) mod flow;
pub(crate) mod labels;
mod lease;
mod leftovers;
mod outside;
mod phases;
mod pipe;
mod progress;
mod qemu;
mod remote;
mod results;
mod source;
pub(crate) mod ssh;
pub(crate) mod token;
#[cfg(test)]
mod under_fire;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub use cleanup::run_cleanup;
pub use flow::run_upload;
use source::{Compression, Format, Transfer};

/// CPU architecture of an image (and of the temporary server that writes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Architecture {
    X86,
    Arm,
}

impl Architecture {
    /// Hetzner's name for it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Architecture::X86 => "x86",
            Architecture::Arm => "arm",
        }
    }

    /// A small server type of this architecture.
    pub(crate) fn default_server_type(self) -> &'static str {
        match self {
            Architecture::X86 => "cx23",
            Architecture::Arm => "cax11",
        }
    }
}

pub(crate) fn parse_label_arg(s: &str) -> Result<(String, String), String> {
    labels::parse_label(s)
}

/// Flags of `hcloud-nixos upload`.
#[derive(Debug, Clone, clap::Args)]
pub struct UploadArgs {
    /// Disk image to upload: a local file or an http(s) URL the rescue system downloads.
    /// Give it several times (with an --architecture each) to upload in parallel.
    #[arg(long = "image", value_name = "PATH|URL", required = true)]
    pub(crate) images: Vec<String>,
    /// Architecture of each --image, in the same order (one value applies to all images).
    #[arg(
        long = "architecture",
        value_name = "x86|arm",
        value_enum,
        required = true
    )]
    pub(crate) architectures: Vec<Architecture>,
    /// Server type of the temporary server [default: cx23 for x86, cax11 for arm].
    #[arg(long, value_name = "TYPE")]
    pub(crate) server_type: Option<String>,
    /// Location of the temporary server (fsn1, nbg1, hel1, ash, hil, sin) [default: Hetzner's choice].
    #[arg(long, value_name = "LOCATION")]
    pub(crate) location: Option<String>,
    /// Description of the snapshot [default: the image's file name and architecture].
    #[arg(long, value_name = "TEXT")]
    pub(crate) description: Option<String>,
    /// Label for the snapshot, as key=value; may be repeated.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label_arg)]
    pub(crate) labels: Vec<(String, String)>,
    /// How the image file is compressed.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) compression: Compression,
    /// Disk image format; qcow2 is converted to raw locally with qemu-img.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) format: Format,
    /// How a local image travels to the rescue system.
    #[arg(long, value_enum, default_value = "zstd")]
    pub(crate) transfer: Transfer,
    /// Upload even when a snapshot of the same image and architecture exists.
    #[arg(long)]
    pub(crate) force: bool,
    /// Print details as JSON on stdout instead of the snapshot IDs.
    #[arg(long)]
    pub(crate) json: bool,
    /// File holding the API token [default: HCLOUD_TOKEN, else the hcloud CLI's active context].
    #[arg(long, value_name = "FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// SSH port of the rescue system.
    #[arg(long, default_value_t = 22, hide = true)]
    pub(crate) rescue_ssh_port: u16,
    /// Disk the image is written to on the rescue system.
    #[arg(long, default_value = "/dev/sda", hide = true)]
    pub(crate) rescue_device: String,
    /// How long to wait for the rescue system to accept SSH.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, hide = true)]
    pub(crate) ssh_timeout: Duration,
    /// Image the temporary server is created with (never booted: it runs the rescue system).
    #[arg(long, default_value = "debian-12", hide = true)]
    pub(crate) server_image: String,
    /// How far ahead the run's lease (the `hcloud-nixos/live-until` label) reaches; renewed
    /// three times in each.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration, hide = true)]
    pub(crate) lease: Duration,
}

/// Flags of `hcloud-nixos cleanup`.
#[derive(Debug, Clone, clap::Args)]
pub struct CleanupArgs {
    /// Delete only temporary servers, keys and unfinished snapshots at least this old (e.g. 30m, 2h, 0s).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub(crate) older_than: Duration,
    /// Delete them even when the upload that made them is still alive (its lease has not run out).
    #[arg(long)]
    pub(crate) force: bool,
    /// Only what this upload run left behind (the ID its error message names).
    #[arg(long, value_name = "RUN")]
    pub(crate) run: Option<String>,
    /// File holding the API token [default: HCLOUD_TOKEN, else the hcloud CLI's active context].
    #[arg(long, value_name = "FILE")]
    pub(crate) token_file: Option<PathBuf>,
}

/// One image to upload, with its architecture.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) index: usize,
    pub(crate) image: String,
    pub(crate) architecture: Architecture,
}

/// Pairs `--image` with `--architecture`: one architecture for all, or one per image.
pub(crate) fn jobs(images: &[String], archs: &[Architecture]) -> Result<Vec<Job>, String> {
    if archs.len() != 1 && archs.len() != images.len() {
        return Err(format!(
            "{} --image but {} --architecture: give one --architecture for all images or one per image, in the same order",
            images.len(),
            archs.len()
        ));
    }
    Ok(images
        .iter()
        .enumerate()
        .map(|(i, img)| Job {
            index: i,
            image: img.clone(),
            architecture: if archs.len() == 1 { archs[0] } else { archs[i] },
        })
        .collect())
}

/// The user's labels as a map; a key given twice is an error.
pub(crate) fn user_labels(pairs: &[(String, String)]) -> Result<BTreeMap<String, String>, String> {
    let mut m = BTreeMap::new();
    for (k, v) in pairs {
        if m.insert(k.clone(), v.clone()).is_some() {
            return Err(format!("--label {k} is given twice: keep one"));
        }
    }
    Ok(m)
}

/// Default snapshot description: the image's file name and architecture.
pub(crate) fn default_description(image: &str, arch: Architecture) -> String {
    let name = image
        .split(['?', '#'])
        .next()
        .unwrap_or(image)
        .rsplit('/')
        .next()
        .unwrap_or(image);
    format!("NixOS {} ({name})", arch.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairing_images_and_architectures() {
        let imgs = vec!["a".to_string(), "b".to_string()];
        let j = jobs(&imgs, &[Architecture::Arm]).unwrap();
        assert!(j.iter().all(|j| j.architecture == Architecture::Arm));
        let j = jobs(&imgs, &[Architecture::X86, Architecture::Arm]).unwrap();
        assert_eq!(j[1].architecture, Architecture::Arm);
        assert_eq!(j[1].image, "b");
        let e = jobs(&imgs, &[Architecture::X86; 3]).unwrap_err();
        assert!(e.contains("2 --image but 3 --architecture"));
    }

    #[test]
    fn duplicate_labels_rejected() {
        let p = vec![("a".into(), "1".into()), ("a".into(), "2".into())];
        assert!(user_labels(&p).unwrap_err().contains("twice"));
    }

    #[test]
    fn descriptions() {
        assert_eq!(
            default_description("/x/nixos.raw.zst", Architecture::X86),
            "NixOS x86 (nixos.raw.zst)"
        );
        assert_eq!(
            default_description("https://h/p/img.qcow2?x=1", Architecture::Arm),
            "NixOS arm (img.qcow2)"
        );
    }
}
