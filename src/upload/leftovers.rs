//! What a run has created and not yet deleted (with the labels it carries), so that clean-up always runs, leases are renewed, and what is left is reported.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use super::api::Kind;

/// A resource a run created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resource {
    pub(crate) kind: Kind,
    pub(crate) id: u64,
    /// Its name (of a snapshot: its description).
    pub(crate) name: String,
}

impl Resource {
    pub(crate) fn new(kind: Kind, id: u64, name: &str) -> Resource {
        Resource {
            kind,
            id,
            name: super::outside::one_line(name, 100),
        }
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Server => "server",
            Kind::SshKey => "SSH key",
            Kind::Image => "snapshot",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.kind_name(), self.id, self.name)
    }
}

impl serde::Serialize for Resource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Resource", 3)?;
        let ty = match self.kind {
            Kind::Server => "server",
            Kind::SshKey => "ssh_key",
            Kind::Image => "snapshot",
        };
        st.serialize_field("type", ty)?;
        st.serialize_field("id", &self.id)?;
        st.serialize_field("name", &self.name)?;
        st.end()
    }
}

/// A created resource, the image of the run it is for, and the labels it carries.
#[derive(Debug, Clone)]
pub(crate) struct Tracked {
    pub(crate) resource: Resource,
    pub(crate) job: usize,
    pub(crate) labels: BTreeMap<String, String>,
}

/// Shared list of created, not yet deleted resources.
#[derive(Clone, Default)]
pub(crate) struct Leftovers {
    inner: Arc<Mutex<Vec<Tracked>>>,
}

impl Leftovers {
    /// Records a resource (once: a second record of the same one changes nothing).
    pub(crate) fn add(&self, resource: Resource, job: usize, labels: BTreeMap<String, String>) {
        let mut l = self.lock();
        if !l.iter().any(|t| same(&t.resource, &resource)) {
            l.push(Tracked {
                resource,
                job,
                labels,
            });
        }
    }

    pub(crate) fn remove(&self, r: &Resource) {
        self.lock().retain(|t| !same(&t.resource, r));
    }

    /// Notes the labels a resource carries now.
    pub(crate) fn set_labels(&self, r: &Resource, labels: BTreeMap<String, String>) {
        if let Some(t) = self.lock().iter_mut().find(|t| same(&t.resource, r)) {
            t.labels = labels;
        }
    }

    pub(crate) fn tracked(&self) -> Vec<Tracked> {
        self.lock().clone()
    }

    pub(crate) fn snapshot(&self) -> Vec<Resource> {
        self.lock().iter().map(|t| t.resource.clone()).collect()
    }

    /// What is left of one image's resources.
    pub(crate) fn of_job(&self, job: usize) -> Vec<Resource> {
        self.lock()
            .iter()
            .filter(|t| t.job == job)
            .map(|t| t.resource.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Tracked>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn same(a: &Resource, b: &Resource) -> bool {
    a.kind == b.kind && a.id == b.id
}

/// Order of deletion: servers first (what costs money, and what uses the key), then snapshots,
/// then keys.
pub(crate) fn deletion_order(mut rs: Vec<Resource>) -> Vec<Resource> {
    rs.sort_by_key(|r| {
        let rank = match r.kind {
            Kind::Server => 0,
            Kind::Image => 1,
            Kind::SshKey => 2,
        };
        (rank, r.id)
    });
    rs.dedup_by(|a, b| same(a, b));
    rs
}

/// The command that deletes what a run left behind.
pub(crate) fn cleanup_command(run_id: &str) -> String {
    format!("hcloud-nixos cleanup --run {run_id} --older-than 0s --force")
}

/// One line telling the user what is left and how to remove it.
pub(crate) fn left_behind_message(rs: &[Resource], run_id: &str) -> String {
    if rs.is_empty() {
        return "nothing was left behind".to_string();
    }
    let list: Vec<String> = rs.iter().map(|r| r.to_string()).collect();
    format!(
        "left behind: {}; delete them with `{}`",
        list.join(", "),
        cleanup_command(run_id)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_message() {
        let k = Resource::new(Kind::SshKey, 1, "k");
        let s = Resource::new(Kind::Server, 2, "s");
        let i = Resource::new(Kind::Image, 3, "NixOS x86\n(img)");
        let o = deletion_order(vec![k.clone(), i.clone(), s.clone(), k.clone()]);
        assert_eq!(o, vec![s.clone(), i.clone(), k.clone()]);
        let m = left_behind_message(&o, "r1");
        assert_eq!(
            m,
            "left behind: server 2 (s), snapshot 3 (NixOS x86 (img)), SSH key 1 (k); delete them with `hcloud-nixos cleanup --run r1 --older-than 0s --force`"
        );
        assert_eq!(left_behind_message(&[], "r1"), "nothing was left behind");
        let v = serde_json::to_value(&i).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "snapshot", "id": 3, "name": "NixOS x86 (img)"})
        );
    }

    #[test]
    fn registry() {
        let l = Leftovers::default();
        let s = Resource::new(Kind::Server, 2, "s");
        l.add(s.clone(), 1, BTreeMap::new());
        l.add(s.clone(), 1, BTreeMap::new());
        assert_eq!(l.snapshot().len(), 1);
        assert_eq!(l.of_job(1), vec![s.clone()]);
        assert!(l.of_job(0).is_empty());
        l.set_labels(&s, BTreeMap::from([("a".into(), "b".into())]));
        assert_eq!(l.tracked()[0].labels["a"], "b");
        l.remove(&s);
        assert!(l.snapshot().is_empty());
    }
}
