//! The run's lease: while the run lives, the `hcloud-nixos/live-until` label of everything it created is moved forward, so that `cleanup` elsewhere leaves it alone.

use std::sync::Arc;
use std::time::Duration;

use super::flow::{Ctx, now_unix};
use super::labels;

/// How often the lease is renewed: three times in each lease, so that one or two failed
/// renewals do not let it run out.
pub(crate) fn renewal_interval(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_secs(1))
}

/// Renews the run's lease in the background until dropped.
pub(crate) struct Keeper {
    task: tokio::task::JoinHandle<()>,
}

impl Keeper {
    pub(crate) fn start(ctx: Arc<Ctx>) -> Keeper {
        let task = tokio::spawn(async move {
            let every = renewal_interval(ctx.lease);
            loop {
                tokio::time::sleep(every).await;
                renew(&ctx).await;
            }
        });
        Keeper { task }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Moves the lease of every resource the run still has forward. A resource gone meanwhile is
/// skipped; a failure is logged and tried again at the next renewal.
async fn renew(ctx: &Ctx) {
    let _labels = ctx.label_lock.lock().await;
    let until = now_unix().saturating_add(ctx.lease.as_secs());
    for t in ctx.leftovers.tracked() {
        let labels = labels::with_live_until(&t.labels, until);
        match ctx
            .api
            .set_labels(t.resource.kind, t.resource.id, &labels)
            .await
        {
            Ok(_) => ctx.leftovers.set_labels(&t.resource, labels),
            Err(e) => tracing::warn!("cannot renew the lease of {}: {e}", t.resource),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewed_three_times_a_lease() {
        assert_eq!(
            renewal_interval(Duration::from_secs(900)),
            Duration::from_secs(300)
        );
        assert_eq!(
            renewal_interval(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }
}
