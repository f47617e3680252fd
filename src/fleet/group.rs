//! A member's life in its group through etcd: a session lease kept alive, the member's record
//! under it, the election of the group's poller (as etcd's own election recipe does it), and
//! watches on the group's desired release (and on freed slots, while this member waits for one)
//! that wake the agent at once. One background task per member, started at its first cycle.
//!
//! Keys under `<prefix>/<group>/`:
//! - `desired`: the release the group should run ([`Desired`]), from the poller or `fleet announce`;
//! - `poller/<lease in hex>`: a candidate ([`Candidate`]) bound to its lease; the key created
//!   first is the poller. Each candidate watches the one created just before its own, and
//!   becomes the poller when none is left before it;
//! - `members/<id>`: the member's record ([`MemberRecord`]) bound to its lease; `seen/<id>`: its
//!   last copy, kept after the lease is gone (how `fleet status` tells who went silent).

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, KeyValue, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, SortOrder, SortTarget, Txn, TxnOp, WatchFilterType, WatchOptions,
    WatchRequestSender,
};
use tokio::sync::{Notify, watch};

use super::conn::{Conn, OP_TIMEOUT, classify};
use super::records::{self, Candidate, Desired, HeldSlot, MemberRecord, json};
use super::{Error, ErrorKind, Member};
use crate::plumbing::retry::Backoff;

/// Watch ids on the session's stream.
const WATCH_DESIRED: i64 = 1;
const WATCH_SLOTS: i64 = 2;
/// The predecessor in the election: ids from here on, a new one each time.
const WATCH_PREDECESSOR: i64 = 100;
/// A freed slot wakes a waiting member after a random delay up to this, so that the waiters of
/// a large group do not all ask in the same instant.
const SLOT_WAKE_SPREAD: Duration = Duration::from_millis(500);

/// What the group looks like to this member right now.
#[derive(Debug, Clone, Default)]
pub(crate) struct View {
    /// The session lease is known to be alive until then.
    pub(crate) live_until: Option<Instant>,
    /// This member is the group's poller.
    pub(crate) poller: bool,
    /// The group's desired release and its key's mod revision.
    pub(crate) desired: Option<(Desired, i64)>,
    /// The desired release was read in this session, and the watches stand.
    pub(crate) synced: bool,
    /// This member waits for a slot (a freed one wakes it).
    pub(crate) waiting: bool,
    pub(crate) slot: Option<HeldSlot>,
    /// The release this member last wrote as the poller.
    pub(crate) written: Option<String>,
}

impl View {
    /// The watches stand and the lease is alive: the view can be trusted.
    pub(crate) fn live(&self) -> bool {
        self.synced && self.live_until.is_some_and(|t| t > Instant::now())
    }
}

struct Shared {
    conn: Arc<Conn>,
    base: String,
    me: Member,
    ttl: Duration,
    /// The group's slots as this member's configuration says.
    slots: u32,
    /// Wakes the agent: the desired release changed, a slot was freed, this member became the poller.
    news: Notify,
    view: Mutex<View>,
    /// The agent's latest report; the task writes it as the member's record.
    report: watch::Sender<Option<MemberRecord>>,
    /// The session lease, for the next session and for revoking it at the end.
    lease: Mutex<Option<i64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn view(&self) -> MutexGuard<'_, View> {
        lock(&self.view)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.base)
    }

    /// The session ended: nothing the view says can be trusted until the next one.
    fn lost(&self) {
        let mut v = self.view();
        v.synced = false;
        v.poller = false;
        v.live_until = None;
    }

    /// The desired release as etcd has it now (`None`: deleted or absent). Wakes the agent when
    /// it changed, unless this member wrote it itself as the poller.
    fn set_desired(&self, kv: Option<&KeyValue>) {
        let desired = kv.filter(|kv| kv.version() > 0).and_then(|kv| {
            match records::parse::<Desired>("the group's desired release", kv.value()) {
                Ok(d) => Some((d, kv.mod_revision())),
                Err(e) => {
                    tracing::warn!("etcd: {e}; following FlakeHub directly until it is mended");
                    None
                }
            }
        });
        let mut v = self.view();
        let before = v.desired.as_ref().map(|(d, _)| d.version.clone());
        let after = desired.as_ref().map(|(d, _)| d.version.clone());
        v.desired = desired;
        let own = v.poller && after.is_some() && after == v.written;
        drop(v);
        if before != after && !own {
            if let Some(version) = &after {
                tracing::info!(version = %version, "the fleet group's desired release changed");
            }
            self.news.notify_one();
        }
    }

    /// Marks the member's record as worth writing again (its poller flag or slot changed).
    fn touch(&self) {
        self.report.send_modify(|_| {});
    }
}

/// Aborts the task when dropped.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A member's place in its group; the background task starts with [`Group::start`].
pub(crate) struct Group {
    shared: Arc<Shared>,
    task: OnceLock<Task>,
}

impl Group {
    pub(crate) fn new(conn: Arc<Conn>, base: &str, me: Member, ttl: Duration, slots: u32) -> Group {
        Group {
            shared: Arc::new(Shared {
                conn,
                base: base.to_string(),
                me,
                ttl,
                slots,
                news: Notify::new(),
                view: Mutex::new(View::default()),
                report: watch::Sender::new(None),
                lease: Mutex::new(None),
            }),
            task: OnceLock::new(),
        }
    }

    /// Starts the background task, once, on the running tokio runtime.
    pub(crate) fn start(&self) {
        if self.task.get().is_some() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let shared = self.shared.clone();
        let _ = self.task.set(Task(tokio::spawn(run(shared))));
    }

    pub(crate) fn view(&self) -> View {
        self.shared.view().clone()
    }

    /// Resolves when there is news for the agent (see [`Shared::news`]); a notice given while
    /// nobody waited is kept for the next wait.
    pub(crate) async fn news(&self) {
        self.shared.news.notified().await
    }

    pub(crate) fn set_waiting(&self, waiting: bool) {
        self.shared.view().waiting = waiting;
    }

    pub(crate) fn set_slot(&self, slot: Option<HeldSlot>) {
        let mut v = self.shared.view();
        if v.slot != slot {
            v.slot = slot;
            drop(v);
            self.shared.touch();
        }
    }

    /// This member, as the poller, writes `version` as the group's desired release (`None`: it
    /// did not after all): its own change does not wake it.
    pub(crate) fn wrote(&self, version: Option<&str>) {
        self.shared.view().written = version.map(str::to_string);
    }

    /// The agent's latest state for the member's record (written when it changed).
    pub(crate) fn report(&self, record: MemberRecord) {
        self.shared.report.send_if_modified(|current| {
            if current.as_ref() == Some(&record) {
                false
            } else {
                *current = Some(record);
                true
            }
        });
    }
}

impl Drop for Group {
    /// Gives the session lease back, so that the member's keys go at once (its place in the
    /// election too), rather than a lease's time later; best effort.
    fn drop(&mut self) {
        let Some(lease) = lock(&self.shared.lease).take() else {
            return;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let conn = self.shared.conn.clone();
            handle.spawn(async move {
                if let Ok(mut c) = conn.client().await {
                    let _ = tokio::time::timeout(OP_TIMEOUT, c.lease_revoke(lease)).await;
                }
            });
        }
    }
}

/// The task: sessions one after another; between them the agent follows FlakeHub directly.
async fn run(sh: Arc<Shared>) {
    let mut report = sh.report.subscribe();
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let Err(e) = session(&sh, &mut report).await;
        sh.lost();
        if started.elapsed() > sh.ttl {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        if failures == 1 {
            tracing::warn!(
                "fleet group: {e}; following FlakeHub directly (and keeping the slot rules) until etcd answers again"
            );
        } else {
            tracing::debug!("fleet group: {e}");
        }
        let backoff = Backoff::doubling(
            Duration::from_millis(500),
            (sh.ttl / 2).max(Duration::from_secs(1)),
        );
        tokio::time::sleep(backoff.delay(failures, fastrand::f64())).await;
    }
}

/// One session: lease, candidacy, watches, record; returns only when something broke.
async fn session(
    sh: &Shared,
    report: &mut watch::Receiver<Option<MemberRecord>>,
) -> Result<std::convert::Infallible, Error> {
    let what = "keeping this server's place in its fleet group";
    let mut c = sh.conn.client().await?;
    let lease = session_lease(sh, &mut c).await?;
    let (mut keeper, mut alive) = sh.conn.call(what, c.lease_keep_alive(lease)).await?;
    keep_alive(sh, &mut keeper, &mut alive, lease).await?;
    let my_rev = campaign(sh, &mut c, lease).await?;
    let desired_key = sh.key("desired");
    let got = sh
        .conn
        .call(what, c.get(desired_key.as_str(), None))
        .await?;
    let rev = got.header().map_or(0, |h| h.revision());
    sh.set_desired(got.kvs().first());
    let (mut watcher, mut stream) = sh
        .conn
        .call(
            what,
            c.watch(
                desired_key.as_str(),
                Some(
                    WatchOptions::new()
                        .with_start_revision(rev + 1)
                        .with_watch_id(WATCH_DESIRED),
                ),
            ),
        )
        .await?
        .split();
    let slots = WatchOptions::new()
        .with_prefix()
        .with_filters([WatchFilterType::NoPut])
        .with_start_revision(rev + 1)
        .with_watch_id(WATCH_SLOTS);
    sh.conn
        .call(what, watcher.watch(sh.key("slots/"), Some(slots)))
        .await?;
    let mut election = Election {
        my_rev,
        watch_id: None,
        next_id: WATCH_PREDECESSOR,
    };
    election.follow(sh, &mut c, &mut watcher).await?;
    sh.view().synced = true;
    let mut written: Option<MemberRecord> = None;
    write_record(sh, &mut c, lease, report, &mut written).await?;
    let mut tick = tokio::time::interval((sh.ttl / 3).max(Duration::from_millis(500)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut wake_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => keep_alive(sh, &mut keeper, &mut alive, lease).await?,
            m = stream.message() => {
                let resp = match m {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err(sh.conn.unreachable(what, "the watch ended")),
                    Err(e) => return Err(classify(what, sh.conn.shown(), e)),
                };
                if resp.canceled() {
                    let why = records::one_line(resp.cancel_reason());
                    return Err(sh.conn.unreachable(what, &format!("a watch was cancelled ({why})")));
                }
                match resp.watch_id() {
                    WATCH_DESIRED => {
                        for ev in resp.events() {
                            sh.set_desired(ev.kv());
                        }
                    }
                    WATCH_SLOTS if !resp.events().is_empty() && sh.view().waiting && wake_at.is_none() => {
                        wake_at = Some(tokio::time::Instant::now() + SLOT_WAKE_SPREAD.mul_f64(fastrand::f64()));
                    }
                    id if Some(id) == election.watch_id
                        && resp.events().iter().any(|e| e.kv().is_some_and(|kv| kv.version() == 0)) =>
                    {
                        election.follow(sh, &mut c, &mut watcher).await?;
                    }
                    _ => {}
                }
            }
            r = report.changed() => {
                if r.is_ok() {
                    write_record(sh, &mut c, lease, report, &mut written).await?;
                }
            }
            _ = sleep_until(wake_at), if wake_at.is_some() => {
                wake_at = None;
                sh.news.notify_one();
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The lease of the last session while it is still alive (its keys and place in the election
/// with it), else a new one.
async fn session_lease(sh: &Shared, c: &mut Client) -> Result<i64, Error> {
    let what = "taking a lease for this server's place in its fleet group";
    let current = *lock(&sh.lease);
    if let Some(id) = current
        && let Ok(r) = sh.conn.call(what, c.lease_time_to_live(id, None)).await
        && r.ttl() > 0
    {
        return Ok(id);
    }
    let id = sh
        .conn
        .call(what, c.lease_grant(sh.ttl.as_secs() as i64, None))
        .await?
        .id();
    *lock(&sh.lease) = Some(id);
    Ok(id)
}

/// Refreshes the session lease and waits for etcd's answer: alive for another TTL, or gone.
async fn keep_alive(
    sh: &Shared,
    keeper: &mut LeaseKeeper,
    alive: &mut LeaseKeepAliveStream,
    lease: i64,
) -> Result<(), Error> {
    let what = "refreshing this server's lease in its fleet group";
    let asked = Instant::now();
    sh.conn.call(what, keeper.keep_alive()).await?;
    let answer = sh.conn.call(what, alive.message()).await?;
    match answer {
        Some(r) if r.ttl() > 0 => {
            // etcd never grants more than was asked; a larger answer is not believed (and
            // cannot overflow the clock).
            let ttl = Duration::from_secs(r.ttl().unsigned_abs()).min(sh.ttl);
            sh.view().live_until = Some(asked + ttl);
            Ok(())
        }
        Some(_) => {
            lock(&sh.lease).take();
            tracing::warn!(lease, "this server's lease in its fleet group expired");
            Err(Error::new(
                ErrorKind::Unreachable,
                "this server's lease in its fleet group expired",
            ))
        }
        None => Err(sh.conn.unreachable(what, "the lease's stream ended")),
    }
}

/// Stands for poller: puts `poller/<lease>` unless it exists (a session on the same lease);
/// returns the key's create revision, its place in the election.
async fn campaign(sh: &Shared, c: &mut Client, lease: i64) -> Result<i64, Error> {
    let what = "standing in the fleet group's election of its poller";
    let key = sh.key(&format!("poller/{lease:x}"));
    let me = Candidate {
        id: sh.me.id.clone(),
        host: sh.me.host.clone(),
    };
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            key.as_str(),
            CompareOp::Equal,
            0,
        )])
        .and_then(vec![TxnOp::put(
            key.as_str(),
            json(&me),
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else(vec![TxnOp::get(key.as_str(), None)]);
    let resp = sh.conn.call(what, c.txn(txn)).await?;
    if resp.succeeded() {
        return Ok(resp.header().map_or(0, |h| h.revision()));
    }
    resp.op_responses()
        .into_iter()
        .find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(KeyValue::create_revision),
            _ => None,
        })
        .ok_or_else(|| sh.conn.unreachable(what, "the candidate's key vanished"))
}

/// This member's place in the election: the key it watches (the candidate created just before
/// its own), until none is left and it is the poller.
struct Election {
    my_rev: i64,
    watch_id: Option<i64>,
    next_id: i64,
}

impl Election {
    async fn follow(
        &mut self,
        sh: &Shared,
        c: &mut Client,
        watcher: &mut WatchRequestSender,
    ) -> Result<(), Error> {
        let what = "following the fleet group's election of its poller";
        if let Some(id) = self.watch_id.take() {
            let _ = watcher.cancel(id).await;
        }
        let before = GetOptions::new()
            .with_prefix()
            .with_max_create_revision(self.my_rev - 1)
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(1);
        let got = sh
            .conn
            .call(what, c.get(sh.key("poller/"), Some(before)))
            .await?;
        let Some(kv) = got.kvs().first() else {
            let was = std::mem::replace(&mut sh.view().poller, true);
            if !was {
                tracing::info!(
                    "this server is now the poller of its fleet group: it asks FlakeHub for the group"
                );
                sh.touch();
                sh.news.notify_one();
            }
            return Ok(());
        };
        sh.view().poller = false;
        let rev = got.header().map_or(0, |h| h.revision());
        let id = self.next_id;
        self.next_id += 1;
        let options = WatchOptions::new()
            .with_start_revision(rev)
            .with_watch_id(id);
        sh.conn
            .call(what, watcher.watch(kv.key(), Some(options)))
            .await?;
        self.watch_id = Some(id);
        Ok(())
    }
}

/// Writes the member's record (`members/<id>` under the lease, `seen/<id>` kept) when it says
/// something new.
async fn write_record(
    sh: &Shared,
    c: &mut Client,
    lease: i64,
    report: &mut watch::Receiver<Option<MemberRecord>>,
    written: &mut Option<MemberRecord>,
) -> Result<(), Error> {
    let mut record = report.borrow_and_update().clone().unwrap_or_default();
    record.id = sh.me.id.clone();
    record.host = sh.me.host.clone();
    record.slots = sh.slots;
    {
        let v = sh.view();
        record.poller = v.poller;
        record.slot = v.slot.clone();
    }
    let now = super::now();
    let same = |a: &MemberRecord, b: &MemberRecord| {
        MemberRecord {
            since: String::new(),
            updated: String::new(),
            ..a.clone()
        } == MemberRecord {
            since: String::new(),
            updated: String::new(),
            ..b.clone()
        }
    };
    if let Some(last) = written.as_ref() {
        if same(last, &record) {
            return Ok(());
        }
        record.since = if last.status == record.status {
            last.since.clone()
        } else {
            now.clone()
        };
    } else {
        record.since = now.clone();
    }
    record.updated = now;
    let value = json(&record);
    let txn = Txn::new().and_then(vec![
        TxnOp::put(
            sh.key(&format!("members/{}", sh.me.id)),
            value.clone(),
            Some(PutOptions::new().with_lease(lease)),
        ),
        TxnOp::put(sh.key(&format!("seen/{}", sh.me.id)), value, None),
    ]);
    sh.conn
        .call(
            "writing this server's record in its fleet group",
            c.txn(txn),
        )
        .await?;
    *written = Some(record);
    Ok(())
}
