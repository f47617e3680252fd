//! The upload and cleanup flows: API calls, SSH and streaming in order, with deadlines, signals and cleanup that always runs.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::api::{self, Client, RetryPolicy};
use super::leftovers::{Leftovers, Resource, deletion_order, left_behind_message};
use super::progress::Reporter;
use super::source::{self, Compression, Format, Location, Transfer};
use super::{
    Architecture, CleanupArgs, Job, UploadArgs, default_description, jobs, labels, remote, ssh,
    token, user_labels,
};

/// Deadline of each phase.
#[derive(Debug, Clone)]
pub struct Deadlines {
    pub create: Duration,
    pub rescue: Duration,
    pub power: Duration,
    pub ssh: Duration,
    pub stream: Duration,
    pub verify: Duration,
    pub snapshot: Duration,
    pub delete: Duration,
}

impl Deadlines {
    fn new(ssh: Duration) -> Self {
        Deadlines {
            create: Duration::from_secs(5 * 60),
            rescue: Duration::from_secs(5 * 60),
            power: Duration::from_secs(5 * 60),
            ssh,
            stream: Duration::from_secs(6 * 3600),
            verify: Duration::from_secs(60 * 60),
            snapshot: Duration::from_secs(90 * 60),
            delete: Duration::from_secs(3 * 60),
        }
    }
}

/// What one upload produced.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub image: String,
    pub architecture: Architecture,
    pub snapshot_id: u64,
    pub sha256: String,
    pub size: u64,
    /// True when an existing snapshot of the same image was reused.
    pub reused: bool,
}

/// Shared by the uploads of one run.
struct Ctx {
    api: Client,
    args: UploadArgs,
    user_labels: BTreeMap<String, String>,
    run_id: String,
    leftovers: Leftovers,
    mutated: AtomicBool,
    report: Reporter,
    deadlines: Deadlines,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_id() -> anyhow::Result<String> {
    let mut b = [0u8; 5];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(source::hex(&b))
}

/// The API endpoint: `HCLOUD_ENDPOINT` or Hetzner's.
pub fn endpoint() -> String {
    std::env::var("HCLOUD_ENDPOINT")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| api::DEFAULT_ENDPOINT.to_string())
}

/// Asks `done` with the API's polling backoff (at most `polls` times) until it says yes, within
/// `deadline`: for states the API reports only when asked (a server off, a snapshot available).
async fn poll_until(
    api: &Client,
    what: &str,
    deadline: Duration,
    polls: u32,
    mut done: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    with_deadline(what, deadline, async {
        for n in 0..polls {
            if done().await? {
                return Ok(());
            }
            let pause = api::poll_delay(api.policy().base, Duration::from_secs(5), n);
            tokio::time::sleep(pause).await;
        }
        anyhow::bail!("{what}: no change after {polls} polls")
    })
    .await
}

async fn with_deadline<T>(
    what: &str,
    d: Duration,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(d, f).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!(
            "{what} did not finish within {}",
            humantime::format_duration(d)
        ),
    }
}

/// Runs `hcloud-nixos upload`.
pub async fn run_upload(args: UploadArgs) -> anyhow::Result<()> {
    let job_list = jobs(&args.images, &args.architectures).map_err(anyhow::Error::msg)?;
    let user_labels = user_labels(&args.labels).map_err(anyhow::Error::msg)?;
    for j in &job_list {
        if let Location::Path(p) = source::parse_location(&j.image)
            && !p.is_file()
        {
            anyhow::bail!(
                "--image {}: no such file; give a path to a disk image or an http(s) URL",
                p.display()
            );
        }
    }
    if !args.rescue_device.starts_with('/') {
        anyhow::bail!(
            "--rescue-device {}: give an absolute path such as /dev/sda",
            args.rescue_device
        );
    }
    let token = token::resolve(args.token_file.as_deref())?;
    let api = Client::new(&endpoint(), token, RetryPolicy::default())?;
    let ctx = Arc::new(Ctx {
        api,
        deadlines: Deadlines::new(args.ssh_timeout),
        args,
        user_labels,
        run_id: random_id()?,
        leftovers: Leftovers::default(),
        mutated: AtomicBool::new(false),
        report: Reporter::new(),
    });

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;

    let work = futures_util::future::join_all(
        job_list
            .iter()
            .map(|j| upload_one_with_cleanup(ctx.clone(), j.clone())),
    );
    let results = tokio::select! {
        r = work => Some(r),
        _ = sigint.recv() => None,
        _ = sigterm.recv() => None,
    };
    if results.is_none() {
        eprintln!("interrupted: cleaning up (interrupt again to leave at once)");
    }

    // Cleanup always runs: whatever this run created and did not delete, and anything labelled
    // with this run (a create call whose answer got lost). A second signal leaves at once.
    if ctx.mutated.load(Ordering::SeqCst) {
        let sweep = sweep_run(&ctx);
        tokio::select! {
            r = sweep => {
                if let Err(e) = r {
                    eprintln!("cleanup failed: {e:#}");
                    eprintln!("{}", left_behind_message(&ctx.leftovers.snapshot()));
                }
            }
            _ = sigint.recv() => {
                anyhow::bail!("interrupted twice: {}", left_behind_message(&ctx.leftovers.snapshot()));
            }
            _ = sigterm.recv() => {
                anyhow::bail!("interrupted twice: {}", left_behind_message(&ctx.leftovers.snapshot()));
            }
        }
    }

    let Some(results) = results else {
        let left = ctx.leftovers.snapshot();
        if left.is_empty() {
            anyhow::bail!("interrupted; cleaned up, nothing was left behind");
        }
        anyhow::bail!("interrupted; {}", left_behind_message(&left));
    };

    let mut outcomes = Vec::new();
    let mut errors = Vec::new();
    for (j, r) in job_list.iter().zip(results) {
        match r {
            Ok(o) => outcomes.push(o),
            Err(e) => errors.push(format!("{}: {e:#}", j.image)),
        }
    }
    if ctx.args.json {
        println!("{}", serde_json::to_string_pretty(&outcomes)?);
    } else {
        for o in &outcomes {
            println!("{}", o.snapshot_id);
        }
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(anyhow::anyhow!("{}", errors.remove(0))),
        n => Err(anyhow::anyhow!("{n} uploads failed: {}", errors.join("; "))),
    }
}

/// Deletes whatever this run still has, by record and by label.
async fn sweep_run(ctx: &Ctx) -> anyhow::Result<()> {
    let sel = labels::run_selector(&ctx.run_id);
    for s in ctx.api.list_servers(&sel).await? {
        ctx.leftovers.add(Resource::Server {
            id: s.id,
            name: s.name,
        });
    }
    for k in ctx.api.list_ssh_keys(&sel).await? {
        ctx.leftovers.add(Resource::SshKey {
            id: k.id,
            name: k.name,
        });
    }
    delete_all(&ctx.api, &ctx.leftovers, &ctx.report, ctx.deadlines.delete).await
}

/// Deletes resources (servers first), removing each from `leftovers` once gone.
async fn delete_all(
    api: &Client,
    leftovers: &Leftovers,
    report: &Reporter,
    deadline: Duration,
) -> anyhow::Result<()> {
    let mut first_err = None;
    for r in deletion_order(leftovers.snapshot()) {
        let res: anyhow::Result<()> = async {
            match &r {
                Resource::Server { id, .. } => {
                    if let Some(a) = api.delete_server(*id).await? {
                        api.wait_action(&a, deadline).await?;
                    }
                }
                Resource::SshKey { id, .. } => api.delete_ssh_key(*id).await?,
            }
            Ok(())
        }
        .await;
        match res {
            Ok(()) => {
                report.line("cleanup", &format!("deleted {r}"));
                leftovers.remove(&r);
            }
            Err(e) => {
                report.line("cleanup", &format!("cannot delete {r}: {e:#}"));
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One upload; its temporary server and key are deleted whether it succeeds or fails.
async fn upload_one_with_cleanup(ctx: Arc<Ctx>, job: Job) -> anyhow::Result<Outcome> {
    let mine = Leftovers::default();
    let result = upload_one(&ctx, &job, &mine).await;
    let created = mine.snapshot();
    if !created.is_empty() {
        if let Err(e) = delete_all(&ctx.api, &mine, &ctx.report, ctx.deadlines.delete).await {
            // What is still there stays in the run's list: the run-wide sweep tries again.
            ctx.report
                .line(&prefix(&job), &format!("cleanup incomplete: {e:#}"));
        }
        let still = mine.snapshot();
        for r in created.iter().filter(|r| !still.contains(r)) {
            ctx.leftovers.remove(r);
        }
    }
    result
}

fn resource_name(run_id: &str, index: usize) -> String {
    format!("hcloud-nixos-upload-{run_id}-{index}")
}

fn prefix(job: &Job) -> String {
    let name = job.image.rsplit('/').next().unwrap_or(&job.image);
    format!("[{} {}]", job.architecture.as_str(), name)
}

fn record(ctx: &Ctx, mine: &Leftovers, r: Resource) {
    ctx.leftovers.add(r.clone());
    mine.add(r);
}

/// Finds an available snapshot of this image and architecture.
async fn existing_snapshot(
    api: &Client,
    sha256: &str,
    arch: Architecture,
) -> anyhow::Result<Option<u64>> {
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
                && i.architecture.as_deref() == Some(arch.as_str())
                && i.labels.get(labels::IMAGE_SHA256) == Some(&want)
        })
        .map(|i| i.id)
        .max())
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

async fn upload_one(ctx: &Ctx, job: &Job, mine: &Leftovers) -> anyhow::Result<Outcome> {
    let args = &ctx.args;
    let p = prefix(job);
    let arch = job.architecture;
    let api = &ctx.api;
    let dl = &ctx.deadlines;

    // 1. The image: local (hash it first, for reuse and verification) or a URL.
    let location = source::parse_location(&job.image);
    let local = match &location {
        Location::Path(path) => {
            let path = path.clone();
            let (c, f) = (args.compression, args.format);
            let phase = ctx.report.phase(&p, "reading the image");
            let img =
                tokio::task::spawn_blocking(move || source::prepare_local(&path, c, f)).await??;
            phase.done();
            let count = Arc::new(AtomicU64::new(0));
            let bar = ctx
                .report
                .bytes(&p, "hashing", img.file_size, count.clone());
            let img = Arc::new(img);
            let img2 = img.clone();
            let (sha, size) =
                tokio::task::spawn_blocking(move || source::hash_image(&img2, count)).await??;
            bar.finish().await;
            ctx.report
                .line(&p, &format!("raw image: {size} bytes, sha256 {sha}"));
            Some((img, sha, size))
        }
        Location::Url(_) => None,
    };
    if let Some((_, sha, size)) = &local
        && !args.force
        && let Some(id) = existing_snapshot(api, sha, arch).await?
    {
        ctx.report.line(
            &p,
            &format!("snapshot {id} holds this image already (--force uploads anyway)"),
        );
        return Ok(Outcome {
            image: job.image.clone(),
            architecture: arch,
            snapshot_id: id,
            sha256: sha.clone(),
            size: *size,
            reused: true,
        });
    }
    let url_plan = match &location {
        Location::Url(u) => {
            let (c, f) = source::resolve_url(u, args.compression, args.format);
            if f == Format::Qcow2 {
                anyhow::bail!(
                    "--image {u}: a qcow2 image can only be uploaded from a local file (it is converted to raw locally); download it and pass the path"
                );
            }
            Some((u.clone(), c))
        }
        Location::Path(_) => None,
    };

    // 2. Temporary key and server, labelled, not started.
    ctx.mutated.store(true, Ordering::SeqCst);
    let name = resource_name(&ctx.run_id, job.index);
    let temp_labels = labels::temporary_labels(&ctx.run_id, now_unix());
    let key = Arc::new(ssh::new_key()?);
    let phase = ctx.report.phase(&p, "creating the temporary server");
    let ssh_key = api
        .create_ssh_key(&name, &ssh::public_openssh(&key)?, &temp_labels)
        .await
        .context("creating the temporary SSH key")?;
    record(
        ctx,
        mine,
        Resource::SshKey {
            id: ssh_key.id,
            name: ssh_key.name.clone(),
        },
    );
    let server_type = args
        .server_type
        .clone()
        .unwrap_or_else(|| arch.default_server_type().to_string());
    let body = api::create_server_body(
        &name,
        &server_type,
        &args.server_image,
        args.location.as_deref(),
        ssh_key.id,
        &temp_labels,
    );
    let (server, action) = api
        .create_server(&body)
        .await
        .context("creating the temporary server")?;
    record(
        ctx,
        mine,
        Resource::Server {
            id: server.id,
            name: server.name.clone(),
        },
    );
    api.wait_action(&action, dl.create)
        .await
        .context("creating the temporary server")?;
    phase.done();

    // 3. Rescue mode, power on.
    let phase = ctx.report.phase(&p, "booting the rescue system");
    let (a, _) = api
        .server_action(
            server.id,
            "enable_rescue",
            Some(&api::enable_rescue_body(ssh_key.id)),
        )
        .await
        .context("enabling rescue mode")?;
    api.wait_action(&a, dl.rescue)
        .await
        .context("enabling rescue mode")?;
    let (a, _) = api
        .server_action(server.id, "poweron", None)
        .await
        .context("powering the server on")?;
    api.wait_action(&a, dl.power)
        .await
        .context("powering the server on")?;
    phase.done();

    // 4. SSH, retried until the rescue system answers.
    let addr = rescue_addr(&server, args.rescue_ssh_port)?;
    let phase = ctx.report.phase(&p, &format!("waiting for SSH on {addr}"));
    let rescue = ssh::connect_retrying(addr, key.clone(), dl.ssh, |n, e| {
        tracing::debug!("SSH attempt {n}: {e}");
        if n % 10 == 0 {
            phase.set_message(&format!("attempt {n}: {e}"));
        }
    })
    .await?;
    phase.done();

    // 5. Discard, stream, verify.
    let dev = &args.rescue_device;
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
            .line(&p, "the disk cannot be discarded: writing every block");
    }

    let (sha, size) = match (&local, &url_plan) {
        (Some((img, pre_sha, pre_size)), _) => {
            let (tx, rx) = mpsc::channel::<Vec<u8>>(16);
            let started = std::time::Instant::now();
            let count = Arc::new(AtomicU64::new(0));
            let bar = ctx
                .report
                .bytes(&p, "uploading", img.file_size, count.clone());
            let reader =
                source::spawn_stream(img.path.clone(), img.compression, args.transfer, tx, count);
            let remote_c = match args.transfer {
                Transfer::Zstd => Compression::Zstd,
                Transfer::None => Compression::None,
            };
            let out = with_deadline(
                "writing the image",
                dl.stream,
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
            let (sha, size) = read?;
            let secs = started.elapsed().as_secs_f64();
            ctx.report.line(
                &p,
                &format!(
                    "streamed {size} bytes in {secs:.2} s ({:.1} MiB/s)",
                    size as f64 / secs.max(0.001) / 1048576.0
                ),
            );
            if sha != *pre_sha || size != *pre_size {
                anyhow::bail!(
                    "the image file changed during the upload (sha256 {pre_sha} before, {sha} while sending): upload it again once it is complete"
                );
            }
            (sha, size)
        }
        (None, Some((url, c))) => {
            let phase = ctx
                .report
                .phase(&p, "the rescue system downloads the image");
            let out = with_deadline(
                "downloading the image",
                dl.stream,
                rescue.run(&remote::write_url(dev, url, *c, sparse)),
            )
            .await?;
            if !out.success() {
                anyhow::bail!(
                    "downloading {url} on the rescue system failed: {}",
                    out.failure_summary()
                );
            }
            phase.done();
            remote::parse_url_result(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| {
                anyhow::anyhow!("the rescue system did not report the image's hash and size")
            })?
        }
        (None, None) => unreachable!("an image is a path or a URL"),
    };

    let phase = ctx.report.phase(&p, "verifying what is on the disk");
    let out = with_deadline(
        "verifying the disk",
        dl.verify,
        rescue.run(&remote::verify(dev, size)),
    )
    .await?;
    let on_disk = remote::parse_hash(&String::from_utf8_lossy(&out.stdout));
    match on_disk {
        Some(h) if out.success() && h == sha => phase.done(),
        Some(h) if out.success() => anyhow::bail!(
            "verification failed: the disk holds sha256 {h} but the image is {sha}; nothing was kept, try again"
        ),
        _ => anyhow::bail!(
            "cannot read the disk back to verify it: {}",
            out.failure_summary()
        ),
    }
    rescue.close().await;

    // A URL's hash is known only now: reuse an earlier snapshot of the same image all the same.
    if local.is_none()
        && !args.force
        && let Some(id) = existing_snapshot(api, &sha, arch).await?
    {
        ctx.report.line(
            &p,
            &format!("snapshot {id} holds this image already (--force uploads anyway)"),
        );
        return Ok(Outcome {
            image: job.image.clone(),
            architecture: arch,
            snapshot_id: id,
            sha256: sha,
            size,
            reused: true,
        });
    }

    // 6. Power off through the API, wait until off.
    let phase = ctx.report.phase(&p, "powering off");
    let (a, _) = api
        .server_action(server.id, "poweroff", None)
        .await
        .context("powering the server off")?;
    api.wait_action(&a, dl.power)
        .await
        .context("powering the server off")?;
    poll_until(
        api,
        "waiting for the server to be off",
        dl.power,
        600,
        async || Ok(api.get_server(server.id).await?.status == "off"),
    )
    .await?;
    phase.done();

    // 7. Snapshot, wait until available.
    let phase = ctx.report.phase(&p, "creating the snapshot");
    let description = args
        .description
        .clone()
        .unwrap_or_else(|| default_description(&job.image, arch));
    let snap_labels = labels::snapshot_labels(&ctx.user_labels, &sha, size);
    let (a, v) = api
        .server_action(
            server.id,
            "create_image",
            Some(&api::create_image_body(&description, &snap_labels)),
        )
        .await
        .context("creating the snapshot")?;
    let image_id = v["image"]["id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("create_image answered without an image id"))?;
    ctx.report
        .line(&p, &format!("snapshot {image_id} is being created"));
    api.wait_action(&a, dl.snapshot)
        .await
        .context("creating the snapshot")?;
    poll_until(
        api,
        "waiting for the snapshot",
        dl.snapshot,
        2000,
        async || Ok(api.get_image(image_id).await?.status == "available"),
    )
    .await?;
    phase.done();
    ctx.report
        .line(&p, &format!("snapshot {image_id} is available"));

    Ok(Outcome {
        image: job.image.clone(),
        architecture: arch,
        snapshot_id: image_id,
        sha256: sha,
        size,
        reused: false,
    })
}

/// Runs `hcloud-nixos cleanup`: deletes temporary servers and keys older than `--older-than`.
pub async fn run_cleanup(args: CleanupArgs) -> anyhow::Result<()> {
    let token = token::resolve(args.token_file.as_deref())?;
    let api = Client::new(&endpoint(), token, RetryPolicy::default())?;
    let report = Reporter::new();
    let sel = labels::temporary_selector();
    let now = now_unix();
    let min_age = args.older_than.as_secs();
    let found = Leftovers::default();
    for s in api.list_servers(&sel).await? {
        if labels::is_stale(&s.labels, now, min_age) {
            found.add(Resource::Server {
                id: s.id,
                name: s.name,
            });
        }
    }
    for k in api.list_ssh_keys(&sel).await? {
        if labels::is_stale(&k.labels, now, min_age) {
            found.add(Resource::SshKey {
                id: k.id,
                name: k.name,
            });
        }
    }
    let n = found.snapshot().len();
    if n == 0 {
        report.line(
            "cleanup",
            &format!(
                "no temporary servers or keys older than {}",
                humantime::format_duration(args.older_than)
            ),
        );
        return Ok(());
    }
    let res = delete_all(&api, &found, &report, Duration::from_secs(180)).await;
    let left = found.snapshot();
    report.line("cleanup", &format!("deleted {} of {n}", n - left.len()));
    res.map_err(|e| anyhow::anyhow!("{e:#}; {}", left_behind_message(&left)))
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
