//! The upload and cleanup commands: a run's uploads side by side, and a clean-up that always runs.
//!
//! Deadlines and signals are handled here; one upload's phases are in `phases`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::api::{self, Client, RetryPolicy};
use super::leftovers::{Leftovers, Resource, deletion_order, left_behind_message};
use super::phases::{prefix, upload_one};
use super::progress::Reporter;
use super::source::{self, Location};
use super::{Architecture, CleanupArgs, Job, UploadArgs, jobs, labels, token, user_labels};

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
}

/// How the uploads of a run ended.
enum Ended {
    /// Every upload finished, with its result, in the order of the jobs.
    Finished(Vec<anyhow::Result<Outcome>>),
    /// A signal came first.
    Interrupted,
}

pub(crate) fn now_unix() -> u64 {
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
pub(crate) fn endpoint() -> String {
    std::env::var("HCLOUD_ENDPOINT")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| api::DEFAULT_ENDPOINT.to_string())
}

/// Asks `done` with the API's polling backoff (at most `polls` times) until it says yes, within
/// `deadline`: for states the API reports only when asked (a server off, a snapshot available).
pub(crate) async fn poll_until(
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
    let ended = tokio::select! {
        r = work => Ended::Finished(r),
        _ = sigint.recv() => Ended::Interrupted,
        _ = sigterm.recv() => Ended::Interrupted,
    };
    if let Ended::Interrupted = ended {
        eprintln!("interrupted: cleaning up (interrupt again to leave at once)");
    }
    // Clean-up always runs; a second signal leaves at once.
    if ctx.mutated.load(Ordering::SeqCst) {
        sweep_unless_interrupted(&ctx, &mut sigint, &mut sigterm).await?;
    }
    let Ended::Finished(results) = ended else {
        let left = ctx.leftovers.snapshot();
        if left.is_empty() {
            anyhow::bail!("interrupted; cleaned up, nothing was left behind");
        }
        anyhow::bail!("interrupted; {}", left_behind_message(&left));
    };
    print_results(&ctx.args, &job_list, results)
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
    Ok(())
}

/// Sweeps what the run created and did not delete, and anything labelled with this run (a
/// create call whose answer got lost). A signal during the sweep ends it, listing what is left.
async fn sweep_unless_interrupted(
    ctx: &Ctx,
    sigint: &mut Signal,
    sigterm: &mut Signal,
) -> anyhow::Result<()> {
    tokio::select! {
        r = sweep_run(ctx) => {
            if let Err(e) = r {
                eprintln!("cleanup failed: {e:#}");
                eprintln!("{}", left_behind_message(&ctx.leftovers.snapshot()));
            }
            Ok(())
        }
        _ = sigint.recv() => {
            anyhow::bail!("interrupted twice: {}", left_behind_message(&ctx.leftovers.snapshot()));
        }
        _ = sigterm.recv() => {
            anyhow::bail!("interrupted twice: {}", left_behind_message(&ctx.leftovers.snapshot()));
        }
    }
}

/// Prints the snapshot IDs (or the outcomes as JSON); fails when any upload failed.
fn print_results(
    args: &UploadArgs,
    job_list: &[Job],
    results: Vec<anyhow::Result<Outcome>>,
) -> anyhow::Result<()> {
    let mut outcomes = Vec::new();
    let mut errors = Vec::new();
    for (j, r) in job_list.iter().zip(results) {
        match r {
            Ok(o) => outcomes.push(o),
            Err(e) => errors.push(format!("{}: {e:#}", source::display_name(&j.image))),
        }
    }
    if args.json {
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
