//! One upload, phase by phase: image, temporary key and server, rescue, write and verify, snapshot.
//!
//! Clean-up is the caller's (`flow`), whatever happens here.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use russh::keys::PrivateKey;
use tokio::sync::mpsc;

use super::api::{self, Client, Kind};
use super::flow::{Ctx, Outcome, now_unix, with_deadline};
use super::leftovers::Resource;
use super::source::{self, Codec, DiskFormat, LocalImage, Location, Transfer};
use super::ssh::Rescue;
use super::{Architecture, Job, default_description, labels, pipe, progress, remote, ssh};

/// The image as the run knows it before anything is created.
enum Source {
    /// A local file, hashed already: its digest is known before the upload. `stamp` is the
    /// file's as it was before hashing: the upload checks that nothing wrote to it since.
    Local {
        image: Arc<LocalImage>,
        digest: Digest,
        stamp: source::Stamp,
    },
    /// A URL the rescue system downloads; the digest is known once it is written.
    Url { url: String, codec: Codec },
}

/// The raw image's SHA-256 (hex) and size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Digest {
    sha256: String,
    size: u64,
}

/// The temporary key and server of one upload (both recorded for clean-up once created).
struct Temporary {
    key: Arc<PrivateKey>,
    ssh_key_id: u64,
    server: api::Server,
}

/// One upload, top-down. What it creates is recorded in the run's list (under the job's index),
/// for the caller to delete.
pub(crate) async fn upload_one(ctx: &Ctx, job: &Job) -> anyhow::Result<Outcome> {
    let p = prefix(job);
    let source = read_source(ctx, job, &p).await?;
    if let Source::Local { digest, .. } = &source
        && let Some(reused) = reuse(ctx, job, digest, &p).await?
    {
        return Ok(reused);
    }
    let temp = create_temporary(ctx, job, &p).await?;
    let rescue = boot_rescue(ctx, &temp, &p).await?;
    let digest = write_and_verify(ctx, &rescue, &source, &p).await?;
    rescue.close().await;
    // A URL's digest is known only now: reuse an earlier snapshot of the same image all the same.
    if let Source::Url { .. } = &source
        && let Some(reused) = reuse(ctx, job, &digest, &p).await?
    {
        return Ok(reused);
    }
    power_off(ctx, &temp, &p).await?;
    let snapshot_id = snapshot(ctx, job, &temp, &digest, &p).await?;
    Ok(Outcome {
        image: job.image.clone(),
        architecture: job.architecture,
        snapshot_id,
        sha256: digest.sha256,
        size: digest.size,
        reused: false,
    })
}

/// A local image is read and hashed (for reuse and verification); a URL is only checked.
async fn read_source(ctx: &Ctx, job: &Job, p: &str) -> anyhow::Result<Source> {
    let args = &ctx.args;
    match source::parse_location(&job.image) {
        Location::Path(path) => {
            let (c, f) = (args.compression, args.format);
            let phase = ctx.report.phase(p, "reading the image");
            let img =
                tokio::task::spawn_blocking(move || source::prepare_local(&path, c, f)).await??;
            phase.done();
            let count = Arc::new(AtomicU64::new(0));
            let bar = ctx.report.bytes(p, "hashing", img.file_size, count.clone());
            let stamp = source::stamp(&img.path).map_err(|e| {
                anyhow::anyhow!("cannot read the image {}: {e}", img.path.display())
            })?;
            let image = Arc::new(img);
            let img2 = image.clone();
            let (sha256, size) =
                tokio::task::spawn_blocking(move || source::hash_image(&img2, count)).await??;
            bar.finish().await;
            ctx.report
                .line(p, &format!("raw image: {size} bytes, sha256 {sha256}"));
            Ok(Source::Local {
                image,
                digest: Digest { sha256, size },
                stamp,
            })
        }
        Location::Url(url) => {
            let (codec, format) = source::resolve_url(&url, args.compression, args.format)?;
            if format == DiskFormat::Qcow2 {
                anyhow::bail!(
                    "--image {}: a qcow2 image can only be uploaded from a local file (it is converted to raw locally); download it and pass the path",
                    source::display_name(&url)
                );
            }
            Ok(Source::Url { url, codec })
        }
    }
}

/// An earlier snapshot of the same image and architecture, unless `--force`.
async fn reuse(ctx: &Ctx, job: &Job, digest: &Digest, p: &str) -> anyhow::Result<Option<Outcome>> {
    if ctx.args.force {
        return Ok(None);
    }
    let Some(id) = existing_snapshot(&ctx.api, &digest.sha256, job.architecture).await? else {
        return Ok(None);
    };
    ctx.report.line(
        p,
        &format!("snapshot {id} holds this image already (--force uploads anyway)"),
    );
    Ok(Some(Outcome {
        image: job.image.clone(),
        architecture: job.architecture,
        snapshot_id: id,
        sha256: digest.sha256.clone(),
        size: digest.size,
        reused: true,
    }))
}

/// Finds an available snapshot of this image and architecture.
async fn existing_snapshot(
    api: &Client,
    sha256: &str,
    arch: Architecture,
) -> anyhow::Result<Option<u64>> {
    // Snapshots still marked temporary are another run's, or a failed one's.
    let sel = labels::image_selector(sha256);
    let images = api
        .list_images(&[
            ("type", "snapshot"),
            ("label_selector", &sel),
            ("architecture", arch.as_str()),
        ])
        .await
        .context("looking for an earlier upload of this image")?;
    let want = labels::hash_label_value(sha256);
    Ok(images
        .into_iter()
        .filter(|i| {
            i.status == "available"
                && !i.labels.contains_key(labels::TEMPORARY)
                && i.architecture.as_deref() == Some(arch.as_str())
                && i.labels.get(labels::IMAGE_SHA256) == Some(&want)
        })
        .map(|i| i.id)
        .max())
}

/// Labels of a temporary resource of this job, created now, with a fresh lease.
fn fresh_labels(ctx: &Ctx, job: &Job) -> std::collections::BTreeMap<String, String> {
    let now = now_unix();
    labels::temporary_labels(&ctx.run_id, job.index, now, now + ctx.lease.as_secs())
}

/// The temporary SSH key and server: labelled, recorded as soon as each exists, not started.
async fn create_temporary(ctx: &Ctx, job: &Job, p: &str) -> anyhow::Result<Temporary> {
    let (args, api) = (&ctx.args, &ctx.api);
    ctx.mutated.store(true, Ordering::SeqCst);
    let name = resource_name(&ctx.run_id, job.index);
    let selector = labels::job_selector(&ctx.run_id, job.index);
    let key = Arc::new(ssh::new_key()?);
    let phase = ctx.report.phase(p, "creating the temporary server");
    let key_labels = fresh_labels(ctx, job);
    let ssh_key = api
        .create_ssh_key(&name, &ssh::public_openssh(&key)?, &key_labels, &selector)
        .await
        .context("creating the temporary SSH key")?;
    let r = Resource::new(Kind::SshKey, ssh_key.id, &ssh_key.name);
    ctx.leftovers.add(r, job.index, key_labels);
    let server_type = args
        .server_type
        .clone()
        .unwrap_or_else(|| job.architecture.default_server_type().to_string());
    let server_labels = fresh_labels(ctx, job);
    let body = api::create_server_body(
        &name,
        &server_type,
        &args.server_image,
        args.location.as_deref(),
        ssh_key.id,
        &server_labels,
    );
    let (server, action) = api
        .create_server(&body, &selector)
        .await
        .context("creating the temporary server")?;
    let r = Resource::new(Kind::Server, server.id, &server.name);
    ctx.leftovers.add(r, job.index, server_labels);
    let created = match action {
        Some(a) => api.wait_action(&a, ctx.deadlines.create).await,
        // Found after a lost answer: created stopped, it is ready once it is off.
        None => wait_status(api, server.id, "off", ctx.deadlines.create).await,
    };
    created.context("creating the temporary server")?;
    phase.done();
    Ok(Temporary {
        key,
        ssh_key_id: ssh_key.id,
        server,
    })
}

/// Rescue mode, power on, then SSH, retried until the rescue system lets us in.
async fn boot_rescue(ctx: &Ctx, temp: &Temporary, p: &str) -> anyhow::Result<Rescue> {
    let (api, dl, id) = (&ctx.api, &ctx.deadlines, temp.server.id);
    let phase = ctx.report.phase(p, "booting the rescue system");
    let rescue_body = api::enable_rescue_body(temp.ssh_key_id);
    let a = api
        .server_action(id, "enable_rescue", Some(&rescue_body))
        .await
        .context("enabling rescue mode")?;
    api.wait_action(&a, dl.rescue)
        .await
        .context("enabling rescue mode")?;
    let a = api
        .server_action(id, "poweron", None)
        .await
        .context("powering the server on")?;
    api.wait_action(&a, dl.power)
        .await
        .context("powering the server on")?;
    phase.done();

    let addr = rescue_addr(&temp.server, ctx.args.rescue_ssh_port)?;
    let phase = ctx.report.phase(p, &format!("waiting for SSH on {addr}"));
    let rescue = ssh::connect_retrying(addr, temp.key.clone(), dl.ssh, |n, e| {
        tracing::debug!("SSH attempt {n}: {e}");
        if n % 10 == 0 {
            phase.set_message(&format!("attempt {n}: {e}"));
        }
    })
    .await?;
    phase.done();
    Ok(rescue)
}

/// The address to SSH to.
fn rescue_addr(server: &api::Server, port: u16) -> anyhow::Result<SocketAddr> {
    let ip: IpAddr = if let Some(v4) = &server.public_net.ipv4 {
        v4.ip.parse()?
    } else if let Some(v6) = &server.public_net.ipv6 {
        // Hetzner gives the /64; the server has ::1 in it.
        let net = v6.ip.split('/').next().unwrap_or(&v6.ip);
        let base: std::net::Ipv6Addr = net.parse()?;
        let mut seg = base.segments();
        seg[7] = 1;
        IpAddr::V6(std::net::Ipv6Addr::from(seg))
    } else {
        anyhow::bail!(
            "the temporary server {} has no public IP address",
            server.id
        );
    };
    Ok(SocketAddr::new(ip, port))
}

/// Empties the disk, writes the image (streamed, or downloaded by the rescue system), and reads
/// it back: the digest of what is on the disk.
async fn write_and_verify(
    ctx: &Ctx,
    rescue: &Rescue,
    source: &Source,
    p: &str,
) -> anyhow::Result<Digest> {
    let sparse = discard(ctx, rescue, p).await?;
    let digest = match source {
        Source::Local {
            image,
            digest,
            stamp,
        } => stream_local(ctx, rescue, (image, stamp), digest, sparse, p).await?,
        Source::Url { url, codec } => download_url(ctx, rescue, url, *codec, sparse, p).await?,
    };
    verify(ctx, rescue, &digest, p).await?;
    Ok(digest)
}

/// Discards the disk; true when it reads as zeros afterwards (zero blocks may be skipped).
async fn discard(ctx: &Ctx, rescue: &Rescue, p: &str) -> anyhow::Result<bool> {
    let dev = &ctx.args.rescue_device;
    let out = rescue.run(&remote::discard(dev)).await?;
    if !out.success() {
        anyhow::bail!(
            "cannot empty {dev} on the rescue system: {}",
            out.failure_summary()
        );
    }
    let sparse = String::from_utf8_lossy(&out.stdout).trim() == "sparse";
    if !sparse {
        ctx.report
            .line(p, "the disk cannot be discarded: writing every block");
    }
    Ok(sparse)
}

/// Streams a local image over SSH. It is not hashed again: the file must not have been written
/// to since it was hashed (its stamp), it must give as many bytes, and the verification that
/// follows compares the disk with the hash taken before.
async fn stream_local(
    ctx: &Ctx,
    rescue: &Rescue,
    (img, stamp): (&LocalImage, &source::Stamp),
    before: &Digest,
    sparse: bool,
    p: &str,
) -> anyhow::Result<Digest> {
    let (args, dev) = (&ctx.args, &ctx.args.rescue_device);
    let (tx, rx) = mpsc::channel(pipe::SSH_DEPTH);
    let started = std::time::Instant::now();
    let cpu_before = progress::cpu_seconds();
    let count = Arc::new(AtomicU64::new(0));
    let bar = ctx
        .report
        .bytes(p, "uploading", img.file_size, count.clone());
    let reader = pipe::spawn_stream(img.path.clone(), img.codec, args.transfer, tx, count);
    let remote_c = match args.transfer {
        Transfer::Zstd => Codec::Zstd,
        Transfer::None => Codec::Plain,
    };
    let out = with_deadline(
        "writing the image",
        ctx.deadlines.stream,
        rescue.run_with_input(&remote::write_stdin(dev, remote_c, sparse), rx),
    )
    .await;
    let read = tokio::task::spawn_blocking(move || reader.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the image reader crashed"))?;
    bar.finish().await;
    let out = out?;
    if !out.success() {
        anyhow::bail!(
            "writing the image on the rescue system failed: {}",
            out.failure_summary()
        );
    }
    let size = read?;
    let secs = started.elapsed().as_secs_f64();
    // The CPU time of the whole process while streaming (other uploads of the same run included).
    let cpu = match (cpu_before, progress::cpu_seconds()) {
        (Some(a), Some(b)) => format!(", {:.2} s of CPU", b - a),
        _ => String::new(),
    };
    ctx.report.line(
        p,
        &format!(
            "streamed {size} bytes in {secs:.2} s ({:.1} MiB/s{cpu})",
            size as f64 / secs.max(0.001) / 1048576.0
        ),
    );
    if size != before.size {
        anyhow::bail!(
            "the image file changed during the upload ({} bytes when hashed, {size} sent): upload it again once it is complete",
            before.size
        );
    }
    if source::stamp(&img.path).ok().as_ref() != Some(stamp) {
        anyhow::bail!(
            "the image file changed during the upload (it was written to, replaced or removed after it was hashed): upload it again once it is complete"
        );
    }
    Ok(before.clone())
}

/// Has the rescue system download the image and write it; it reports what it wrote.
async fn download_url(
    ctx: &Ctx,
    rescue: &Rescue,
    url: &str,
    codec: Codec,
    sparse: bool,
    p: &str,
) -> anyhow::Result<Digest> {
    let dev = &ctx.args.rescue_device;
    let phase = ctx.report.phase(p, "the rescue system downloads the image");
    let out = with_deadline(
        "downloading the image",
        ctx.deadlines.stream,
        rescue.run(&remote::write_url(dev, url, codec, sparse)),
    )
    .await?;
    if !out.success() {
        anyhow::bail!(
            "downloading {} on the rescue system failed: {}",
            source::display_name(url),
            out.failure_summary()
        );
    }
    phase.done();
    let (sha256, size) = remote::parse_url_result(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| {
            anyhow::anyhow!("the rescue system did not report the image's hash and size")
        })?;
    Ok(Digest { sha256, size })
}

/// Reads the disk back: it must hold exactly the image.
async fn verify(ctx: &Ctx, rescue: &Rescue, digest: &Digest, p: &str) -> anyhow::Result<()> {
    let dev = &ctx.args.rescue_device;
    let phase = ctx.report.phase(p, "verifying what is on the disk");
    let out = with_deadline(
        "verifying the disk",
        ctx.deadlines.verify,
        rescue.run(&remote::verify(dev, digest.size)),
    )
    .await?;
    let sha = &digest.sha256;
    match remote::parse_hash(&String::from_utf8_lossy(&out.stdout)) {
        Some(h) if out.success() && h == *sha => {
            phase.done();
            Ok(())
        }
        Some(h) if out.success() => anyhow::bail!(
            "verification failed: the disk holds sha256 {h} but the image is {sha}; nothing was kept, try again"
        ),
        _ => anyhow::bail!(
            "cannot read the disk back to verify it: {}",
            out.failure_summary()
        ),
    }
}

/// Powers the server off through the API and waits until it is off.
async fn power_off(ctx: &Ctx, temp: &Temporary, p: &str) -> anyhow::Result<()> {
    let (api, dl, id) = (&ctx.api, &ctx.deadlines, temp.server.id);
    let phase = ctx.report.phase(p, "powering off");
    let a = api
        .server_action(id, "poweroff", None)
        .await
        .context("powering the server off")?;
    api.wait_action(&a, dl.power)
        .await
        .context("powering the server off")?;
    wait_status(api, id, "off", dl.power)
        .await
        .context("waiting for the server to be off")?;
    phase.done();
    Ok(())
}

/// Polls a server until its status is `status`.
async fn wait_status(
    api: &Client,
    id: u64,
    status: &str,
    deadline: std::time::Duration,
) -> Result<(), api::ApiError> {
    let what = format!("server {id} becoming {status}");
    api.poll(&what, deadline, async |_| {
        Ok((api.get_server(id).await?.status == status).then_some(()))
    })
    .await
}

/// Snapshots the disk, labelled with the digest, and waits until the snapshot is available.
async fn snapshot(
    ctx: &Ctx,
    job: &Job,
    temp: &Temporary,
    digest: &Digest,
    p: &str,
) -> anyhow::Result<u64> {
    let (args, api, deadline) = (&ctx.args, &ctx.api, ctx.deadlines.snapshot);
    let phase = ctx.report.phase(p, "creating the snapshot");
    let description = args
        .description
        .clone()
        .unwrap_or_else(|| default_description(&job.image, job.architecture));
    let done_labels = labels::snapshot_labels(&ctx.user_labels, &digest.sha256, digest.size);
    // Temporary until it is available and verified: a failed run's snapshot is cleanup's.
    let mut temp_labels = done_labels.clone();
    temp_labels.extend(fresh_labels(ctx, job));
    let body = api::create_image_body(&description, &temp_labels);
    let selector = labels::job_selector(&ctx.run_id, job.index);
    let (image_id, action) = api
        .create_image(temp.server.id, &body, &selector)
        .await
        .context("creating the snapshot")?;
    let image = Resource::new(Kind::Image, image_id, &description);
    ctx.leftovers.add(image.clone(), job.index, temp_labels);
    ctx.report
        .line(p, &format!("snapshot {image_id} is being created"));
    if let Some(a) = action {
        api.wait_action(&a, deadline)
            .await
            .context("creating the snapshot")?;
    }
    let what = format!("snapshot {image_id} becoming available");
    api.poll(&what, deadline, async |_| {
        Ok((api.get_image(image_id).await?.status == "available").then_some(()))
    })
    .await
    .context("waiting for the snapshot")?;
    // Done: no longer temporary, and no longer the run's to delete. The lease keeper does not
    // write labels in between.
    let _labels = ctx.label_lock.lock().await;
    let still_there = api
        .set_labels(Kind::Image, image_id, &done_labels)
        .await
        .context("marking the snapshot as done")?;
    if !still_there {
        anyhow::bail!("snapshot {image_id} disappeared before it was done");
    }
    ctx.leftovers.remove(&image);
    phase.done();
    ctx.report
        .line(p, &format!("snapshot {image_id} is available"));
    Ok(image_id)
}

fn resource_name(run_id: &str, index: usize) -> String {
    format!("hcloud-nixos-upload-{run_id}-{index}")
}

/// What each line of one upload starts with: its architecture and file name (of a URL, without
/// the query, which may carry credentials).
pub(crate) fn prefix(job: &Job) -> String {
    let shown = source::display_name(&job.image);
    let name = shown.rsplit('/').next().unwrap_or(&shown);
    format!("[{} {}]", job.architecture.as_str(), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(v4: Option<&str>, v6: Option<&str>) -> api::Server {
        serde_json::from_value(serde_json::json!({
            "id": 1, "name": "s", "status": "running",
            "public_net": {
                "ipv4": v4.map(|ip| serde_json::json!({"ip": ip})),
                "ipv6": v6.map(|ip| serde_json::json!({"ip": ip})),
            }
        }))
        .unwrap()
    }

    #[test]
    fn rescue_address() {
        assert_eq!(
            rescue_addr(&server(Some("1.2.3.4"), None), 22).unwrap(),
            "1.2.3.4:22".parse().unwrap()
        );
        assert_eq!(
            rescue_addr(&server(None, Some("2001:db8::/64")), 2222).unwrap(),
            "[2001:db8::1]:2222".parse().unwrap()
        );
        assert!(rescue_addr(&server(None, None), 22).is_err());
    }

    #[test]
    fn resource_names() {
        let n = resource_name("abc", 2);
        assert_eq!(n, "hcloud-nixos-upload-abc-2");
        assert!(n.len() <= 63);
    }
}
