//! The upload command: a run's uploads side by side, its lease, and a clean-up that always runs.
//!
//! Deadlines and signals are handled here; one upload's phases are in `phases`, the report at
//! the end in `results`, `cleanup` in `cleanup`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::api::{self, Client, Kind, RetryPolicy};
use super::cleanup::delete_all;
use super::leftovers::{Leftovers, Resource, left_behind_message};
use super::phases::{prefix, upload_one};
use super::progress::Reporter;
use super::source::{self, Location};
use super::{Architecture, Job, UploadArgs, jobs, labels, lease, results, token, user_labels};

/// Deadline of each phase.
#[derive(Debug, Clone)]
pub(crate) struct Deadlines {
    pub(crate) create: Duration,
    pub(crate) rescue: Duration,
    pub(crate) power: Duration,
    pub(crate) ssh: Duration,
    pub(crate) stream: Duration,
    pub(crate) verify: Duration,
    pub(crate) snapshot: Duration,
    pub(crate) delete: Duration,
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
pub(crate) struct Outcome {
    pub(crate) image: String,
    pub(crate) architecture: Architecture,
    pub(crate) snapshot_id: u64,
    pub(crate) sha256: String,
    pub(crate) size: u64,
    /// True when an existing snapshot of the same image was reused.
    pub(crate) reused: bool,
}

/// Shared by the uploads of one run.
pub(crate) struct Ctx {
    pub(crate) api: Client,
    pub(crate) args: UploadArgs,
    pub(crate) user_labels: BTreeMap<String, String>,
    pub(crate) run_id: String,
    /// What the run created and has not deleted yet.
    pub(crate) leftovers: Leftovers,
    /// Set before the first call that creates something: then the run sweeps at the end.
    pub(crate) mutated: AtomicBool,
    pub(crate) report: Reporter,
    pub(crate) deadlines: Deadlines,
    /// How far ahead the run's lease reaches (`hcloud-nixos/live-until`).
    pub(crate) lease: Duration,
    /// Held while labels are written: the lease keeper never writes over a finished
    /// snapshot's labels.
    pub(crate) label_lock: tokio::sync::Mutex<()>,
    /// Each upload's result, by its index, once it has one.
    pub(crate) results: Mutex<Vec<Option<Result<Outcome, String>>>>,
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn random_id() -> anyhow::Result<String> {
    let mut b = [0u8; 5];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(source::hex(&b))
}

/// The API endpoint: `HCLOUD_ENDPOINT` or Hetzner's.
pub(crate) fn endpoint() -> String {
    std::env::var("HCLOUD_ENDPOINT")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| api::DEFAULT_ENDPOINT.to_string())
}

pub(crate) async fn with_deadline<T>(
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
    check_args(&args, &job_list)?;
    let token = token::resolve(args.token_file.as_deref())?;
    let api = Client::new(&endpoint(), token, RetryPolicy::default())?;
    let ctx = Arc::new(Ctx {
        api,
        deadlines: Deadlines::new(args.ssh_timeout),
        lease: args.lease,
        args,
        user_labels,
        run_id: random_id()?,
        leftovers: Leftovers::default(),
        mutated: AtomicBool::new(false),
        report: Reporter::new(),
        label_lock: tokio::sync::Mutex::new(()),
        results: Mutex::new(vec![None; job_list.len()]),
    });
    let keeper = lease::Keeper::start(ctx.clone());

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let work = futures_util::future::join_all(
        job_list
            .iter()
            .map(|j| upload_one_with_cleanup(ctx.clone(), j.clone())),
    );
    let interrupted = tokio::select! {
        _ = work => false,
        _ = sigint.recv() => true,
        _ = sigterm.recv() => true,
    };
    if interrupted {
        eprintln!("interrupted: cleaning up (interrupt again to leave at once)");
    }
    // Clean-up always runs; a second signal leaves at once.
    if ctx.mutated.load(Ordering::SeqCst)
        && let Err(e) = sweep_unless_interrupted(&ctx, &mut sigint, &mut sigterm).await
    {
        results::print(&ctx, &job_list, true);
        return Err(e);
    }
    drop(keeper);
    results::print(&ctx, &job_list, interrupted);
    results::verdict(&ctx, &job_list, interrupted)
}

/// Local images must exist and the device be a path before anything is created.
fn check_args(args: &UploadArgs, job_list: &[Job]) -> anyhow::Result<()> {
    for j in job_list {
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
    if args.lease < Duration::from_secs(3) {
        anyhow::bail!("--lease must be at least 3s");
    }
    Ok(())
}

/// Sweeps what the run created and did not delete, and anything labelled with this run (a
/// create call whose answer got lost). A signal during the sweep ends it, listing what is left.
async fn sweep_unless_interrupted(
    ctx: &Ctx,
    sigint: &mut Signal,
    sigterm: &mut Signal,
) -> anyhow::Result<()> {
    let twice = || {
        let left = left_behind_message(&ctx.leftovers.snapshot(), &ctx.run_id);
        anyhow::anyhow!("interrupted twice: {left}")
    };
    tokio::select! {
        r = sweep_run(ctx) => {
            if let Err(e) = r {
                ctx.report.line("cleanup", &format!("incomplete: {e:#}"));
            }
            Ok(())
        }
        _ = sigint.recv() => Err(twice()),
        _ = sigterm.recv() => Err(twice()),
    }
}

/// Deletes whatever this run still has, by record and by label.
async fn sweep_run(ctx: &Ctx) -> anyhow::Result<()> {
    let sel = labels::run_selector(&ctx.run_id);
    let found = find_temporaries(&ctx.api, &sel).await;
    for (r, l) in found.iter().flatten() {
        let job = labels::job_of(l).unwrap_or(0);
        ctx.leftovers.add(r.clone(), job, l.clone());
    }
    let deleted = delete_all(&ctx.api, &ctx.leftovers, &ctx.report, ctx.deadlines.delete).await;
    found?;
    deleted
}

/// The temporary servers, SSH keys and snapshots matching a label selector, with their labels.
pub(crate) async fn find_temporaries(
    api: &Client,
    selector: &str,
) -> anyhow::Result<Vec<(Resource, BTreeMap<String, String>)>> {
    let mut found = Vec::new();
    for s in api.list_servers(selector).await? {
        found.push((Resource::new(Kind::Server, s.id, &s.name), s.labels));
    }
    for k in api.list_ssh_keys(selector).await? {
        found.push((Resource::new(Kind::SshKey, k.id, &k.name), k.labels));
    }
    let filters = [("type", "snapshot"), ("label_selector", selector)];
    for i in api.list_images(&filters).await? {
        let name = i.description.unwrap_or_default();
        found.push((Resource::new(Kind::Image, i.id, &name), i.labels));
    }
    Ok(found)
}

/// One upload; its temporary server, key and (unfinished) snapshot are deleted whether it
/// succeeds or fails. Its result is kept in the run's list.
async fn upload_one_with_cleanup(ctx: Arc<Ctx>, job: Job) {
    let result = upload_one(&ctx, &job).await;
    let mine = Leftovers::default();
    for t in ctx
        .leftovers
        .tracked()
        .into_iter()
        .filter(|t| t.job == job.index)
    {
        mine.add(t.resource, t.job, t.labels);
    }
    if !mine.snapshot().is_empty() {
        let deleted = delete_all(&ctx.api, &mine, &ctx.report, ctx.deadlines.delete).await;
        if let Err(e) = deleted {
            // What is still there stays in the run's list: the run-wide sweep tries again.
            ctx.report
                .line(&prefix(&job), &format!("cleanup incomplete: {e:#}"));
        }
        let still = mine.snapshot();
        for r in ctx.leftovers.of_job(job.index) {
            if !still.contains(&r) {
                ctx.leftovers.remove(&r);
            }
        }
    }
    let mut results = ctx.results.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(slot) = results.get_mut(job.index) {
        *slot = Some(result.map_err(|e| format!("{e:#}")));
    }
}
