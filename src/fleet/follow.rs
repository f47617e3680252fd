//! Following the group's desired release instead of every server polling FlakeHub: the group's
//! poller resolves the reference and writes the release into etcd (`desired`); every other
//! member takes it from its watch and checks it against FlakeHub itself (the exact version, not
//! yanked, within its own reference's constraint, and its own output's store path) before the
//! agent may apply it. Without a live view of etcd a member polls FlakeHub itself, as without a
//! fleet. `fleet announce` writes the same key from CI.

use std::sync::Mutex;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};

use super::etcd::EtcdCoordinator;
use super::records::{Desired, json};
use super::{Coordinator, Error};
use crate::agent::flakehub::{self, Resolved};
use crate::agent::flakeref::FlakeRef;

/// The last desired release this member checked against FlakeHub, and what it resolved to.
#[derive(Debug, Default)]
pub(crate) struct Checked(Mutex<Option<(String, Resolved)>>);

impl Checked {
    fn get(&self, key: &str) -> Option<Resolved> {
        let guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .filter(|(k, _)| k == key)
            .map(|(_, r)| r.clone())
    }

    fn put(&self, key: String, resolved: Resolved) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((key, resolved));
    }
}

/// The release this server should run: with an etcd fleet, the group's (see the module
/// documentation); otherwise what FlakeHub resolves the reference to.
pub async fn resolve(
    coordinator: &Coordinator,
    flakehub: &flakehub::Client,
    flake: &FlakeRef,
    attr: &str,
) -> Result<Resolved, flakehub::Error> {
    match coordinator {
        Coordinator::Etcd(c) => c.follow(flakehub, flake, attr).await,
        Coordinator::FleetLock(_) => flakehub.resolve(flake, attr).await,
    }
}

/// `org/flake` of a reference.
fn flake_name(flake: &FlakeRef) -> String {
    format!("{}/{}", flake.org, flake.flake)
}

/// `a` is a newer version than `b` (semver precedence; unparsable ones are never newer).
fn newer(a: &str, b: &str) -> bool {
    match (semver::Version::parse(a), semver::Version::parse(b)) {
        (Ok(a), Ok(b)) => a.cmp_precedence(&b) == std::cmp::Ordering::Greater,
        _ => false,
    }
}

impl EtcdCoordinator {
    /// [`resolve`] for the etcd backend.
    pub(crate) async fn follow(
        &self,
        flakehub: &flakehub::Client,
        flake: &FlakeRef,
        attr: &str,
    ) -> Result<Resolved, flakehub::Error> {
        self.group.start();
        // A new cycle: until it asks for a slot again, a freed one is no news for it.
        self.group.set_waiting(false);
        let view = self.group.view();
        if !view.live() {
            return flakehub.resolve(flake, attr).await;
        }
        if view.poller {
            return self
                .poll_for_group(flakehub, flake, attr, view.desired)
                .await;
        }
        match view.desired {
            Some((d, _)) if d.flake.as_deref().is_none_or(|f| f == flake_name(flake)) => {
                self.check(flakehub, flake, attr, &d).await
            }
            Some((d, _)) => {
                tracing::warn!(
                    "the fleet group's desired release is of {}, this server follows {}: asking FlakeHub itself",
                    d.flake.as_deref().unwrap_or("?"),
                    flake_name(flake)
                );
                flakehub.resolve(flake, attr).await
            }
            // Nobody wrote one yet (a group's first minutes).
            None => flakehub.resolve(flake, attr).await,
        }
    }

    /// The poller: resolves the reference, keeps an announced release that is newer and served
    /// (CI announced it before FlakeHub's answer for the constraint caught up), and otherwise
    /// makes the group's desired release what FlakeHub resolved.
    async fn poll_for_group(
        &self,
        flakehub: &flakehub::Client,
        flake: &FlakeRef,
        attr: &str,
        current: Option<(Desired, i64)>,
    ) -> Result<Resolved, flakehub::Error> {
        let resolved = flakehub.resolve(flake, attr).await?;
        if let Some((d, _)) = &current {
            if d.version == resolved.version {
                return Ok(resolved);
            }
            if d.announced()
                && newer(&d.version, &resolved.version)
                && let Ok(announced) = self.check(flakehub, flake, attr, d).await
            {
                return Ok(announced);
            }
        }
        let record = Desired {
            version: resolved.version.clone(),
            flake: Some(flake_name(flake)),
            by: format!("poller {} (id {})", self.me.host, self.me.id),
            at: super::now(),
        };
        // Said before it is written: the watch may bring the change back before the answer.
        self.group.wrote(Some(&record.version));
        match self
            .write_desired(&record, Some(current.as_ref().map_or(0, |(_, rev)| *rev)))
            .await
        {
            Ok(true) => {
                tracing::info!(version = %record.version, group = %self.fleet.group, "told the fleet group about a new release");
            }
            Ok(false) => {
                self.group.wrote(None);
                tracing::debug!("the group's desired release changed meanwhile");
            }
            Err(e) => {
                self.group.wrote(None);
                tracing::warn!("cannot tell the fleet group about {}: {e}", record.version);
            }
        }
        Ok(resolved)
    }

    /// Checks the group's desired release against FlakeHub: the exact version exists, is not
    /// yanked, matches this server's reference, and has a store path for this server's output.
    /// Remembered until the desired release changes.
    async fn check(
        &self,
        flakehub: &flakehub::Client,
        flake: &FlakeRef,
        attr: &str,
        d: &Desired,
    ) -> Result<Resolved, flakehub::Error> {
        let key = format!("{} {} {attr}", d.version, flake);
        if let Some(r) = self.checked.get(&key) {
            return Ok(r);
        }
        let refuse = |why: String| {
            flakehub::Error::NotFound(format!(
                "the fleet group's desired release {} (from {} at {}) is not applied: {why}",
                d.version, d.by, d.at
            ))
        };
        let exact = FlakeRef {
            version: format!("={}", d.version),
            ..flake.clone()
        };
        let release = match flakehub.release(&exact).await {
            Ok(r) => r,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => return Err(refuse(e.to_string())),
        };
        let same = semver::Version::parse(&release.version)
            .ok()
            .zip(semver::Version::parse(&d.version).ok())
            .is_some_and(|(a, b)| a.cmp_precedence(&b).is_eq() && (b.build.is_empty() || a == b));
        if !same {
            return Err(refuse(format!(
                "FlakeHub answered with release {} for it",
                release.version
            )));
        }
        if release.yanked {
            return Err(refuse(format!(
                "FlakeHub has yanked it from {}",
                flake_name(flake)
            )));
        }
        if flakehub::newest_unyanked(std::slice::from_ref(&release), &flake.version).is_none() {
            return Err(refuse(format!(
                "it does not match this server's reference {flake}"
            )));
        }
        // The client checks that the answer is a store path where it enters.
        let store_path = match flakehub.output(flake, &release.version, attr).await {
            Ok(path) => path,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => return Err(refuse(e.to_string())),
        };
        let resolved = Resolved {
            version: release.version,
            attr: attr.to_string(),
            store_path,
            published_at: release.published_at,
        };
        self.checked.put(key, resolved.clone());
        Ok(resolved)
    }

    /// Writes the group's desired release. `expected`: only while the key's mod revision is
    /// still this (0: while it does not exist); `Ok(false)` when it was not.
    pub(crate) async fn write_desired(
        &self,
        record: &Desired,
        expected: Option<i64>,
    ) -> Result<bool, Error> {
        let what = "writing the fleet group's desired release";
        let mut c = self.conn.client().await?;
        let key = format!("{}desired", self.base);
        let compares = match expected {
            Some(0) => vec![Compare::create_revision(key.as_str(), CompareOp::Equal, 0)],
            Some(rev) => vec![Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)],
            None => vec![],
        };
        let txn = Txn::new().when(compares).and_then(vec![TxnOp::put(
            key.as_str(),
            json(record),
            None::<PutOptions>,
        )]);
        Ok(self.conn.call(what, c.txn(txn)).await?.succeeded())
    }
}
