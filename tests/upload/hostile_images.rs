//! Crafted images: a qcow2 header may name other files (a backing file, an external data file)
//! that `qemu-img convert` would read into the snapshot. Such images are refused before anything
//! is created, and the secret they point at never reaches the rescue system.

use std::path::Path;
use std::process::Command as StdCommand;

use crate::*;

/// A secret the uploader can read: the hcloud CLI's configuration with its token.
const SECRET: &str = "hcloud-secret-token-DO-NOT-UPLOAD-0123456789abcdef";

fn qemu_img(args: &[&str]) {
    let out = StdCommand::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        text(&out.stderr)
    );
}

/// The hcloud CLI's configuration in the test's HOME, padded to 1 MiB as a raw disk would be.
fn plant_secret(b: &Bench) -> std::path::PathBuf {
    let dir = b.dir.path().join(".config/hcloud");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("cli.toml");
    let mut cfg = format!(
        "active_context = \"work\"\n\n[[contexts]]\nname = \"work\"\ntoken = \"{SECRET}\"\n"
    )
    .into_bytes();
    cfg.resize(1 << 20, b'\n');
    write(&p, &cfg);
    p
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Runs the upload of a crafted image and checks that it was refused, saying `why`, before
/// anything was created, and that the secret is nowhere on the "rescue system's" disk.
async fn refused(b: &Bench, case: &str, image: &Path, extra: &[&str], why: &str) {
    let p = image.to_str().unwrap();
    let mut args = vec!["--image", p, "--architecture", "x86"];
    args.extend_from_slice(extra);
    let out = run(upload_cmd(b, &args)).await;
    let disk = std::fs::read(&b.disk).unwrap();
    assert!(
        !contains(&disk, SECRET),
        "{case}: the secret reached the rescue system's disk (the upload {})\n{}",
        if out.status.success() {
            "succeeded"
        } else {
            "failed"
        },
        text(&out.stderr)
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{case}: the upload succeeded\n{err}");
    assert!(err.contains(why), "{case}: expected '{why}' in\n{err}");
    assert!(
        !err.contains(SECRET),
        "{case}: the secret is in the error\n{err}"
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{case}: one error line\n{err}");
    assert!(
        errors[0].starts_with(&format!("error: {}: the image ", image.display())),
        "{case}: {err}"
    );
    b.api.with(|s| {
        assert!(
            s.mutating_requests().is_empty(),
            "{case}: something was created for a refused image: {:?}",
            s.mutating_requests()
        )
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qcow2_naming_other_files_never_reaches_the_rescue_system() {
    let Some(b) = bench("hostile-qcow2", None).await else {
        return;
    };
    let secret = plant_secret(&b);
    let secret_s = secret.to_str().unwrap();
    let d = b.dir.path();

    // A backing file named by its absolute path.
    let evil = d.join("evil.qcow2");
    let evil_s = evil.to_str().unwrap();
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", secret_s, "-F", "raw", evil_s, "1M",
    ]);
    refused(&b, "absolute backing file", &evil, &[], "backing file").await;
    refused(
        &b,
        "with --format qcow2",
        &evil,
        &["--format", "qcow2"],
        "backing file",
    )
    .await;

    // A backing file named relative to the image.
    let rel = d.join("rel.qcow2");
    let rel_s = rel.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        ".config/hcloud/cli.toml",
        "-F",
        "raw",
        rel_s,
        "1M",
    ]);
    refused(&b, "relative backing file", &rel, &[], "backing file").await;

    // The same image compressed: it is decompressed elsewhere, so a relative name would not
    // resolve, but an absolute one does.
    let zst = d.join("evil.qcow2.zst");
    write(
        &zst,
        &zstd::encode_all(&std::fs::read(&evil).unwrap()[..], 3).unwrap(),
    );
    refused(&b, "compressed, backing file", &zst, &[], "backing file").await;

    // An external data file: the guest's data lives in another file, which is the secret.
    let data = d.join("data.raw");
    let ext = d.join("ext.qcow2");
    let opts = format!("data_file={},data_file_raw=on", data.display());
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts,
        ext.to_str().unwrap(),
        "1M",
    ]);
    std::fs::copy(&secret, &data).unwrap();
    refused(&b, "external data file", &ext, &[], "external data file").await;
    assert_nothing_left(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_in_another_format_than_expected_is_refused() {
    let Some(b) = bench("other-formats", None).await else {
        return;
    };
    let d = b.dir.path();
    // A VMDK is not a raw disk: uploading its bytes would make a snapshot that does not boot.
    let vmdk = d.join("disk.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", vmdk.to_str().unwrap(), "1M"]);
    refused(&b, "vmdk as auto", &vmdk, &[], "VMDK").await;
    // --format qcow2 on a file that is not qcow2.
    let raw = d.join("plain.raw");
    write(&raw, &image_bytes(1 << 20, 40));
    refused(
        &b,
        "raw as qcow2",
        &raw,
        &["--format", "qcow2"],
        "not a qcow2 image",
    )
    .await;
    // An encrypted qcow2 cannot be converted without its key.
    let enc = d.join("enc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=abc",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        enc.to_str().unwrap(),
        "1M",
    ]);
    refused(&b, "encrypted", &enc, &[], "encrypted").await;
    // A header claiming a disk larger than any server's: refused before 2 TiB of zeros are hashed.
    let big = d.join("big.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", big.to_str().unwrap(), "2T"]);
    refused(&b, "2 TiB virtual size", &big, &[], "larger than").await;
    // --format raw uploads the bytes as they are, whatever they look like.
    let out = run(upload_cmd(
        &b,
        &[
            "--image",
            vmdk.to_str().unwrap(),
            "--architecture",
            "x86",
            "--format",
            "raw",
        ],
    ))
    .await;
    let id = snapshot_id(&out);
    assert_snapshot(&b, id, &std::fs::read(&vmdk).unwrap(), "x86");
    assert_nothing_left(&b);
}
