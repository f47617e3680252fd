//! What an upload has created and not yet deleted, so that cleanup can always run and report what is left.

use std::fmt;
use std::sync::{Arc, Mutex};

/// A temporary resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resource {
    Server { id: u64, name: String },
    SshKey { id: u64, name: String },
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Server { id, name } => write!(f, "server {id} ({name})"),
            Resource::SshKey { id, name } => write!(f, "SSH key {id} ({name})"),
        }
    }
}

/// Shared list of created, not yet deleted resources.
#[derive(Clone, Default)]
pub(crate) struct Leftovers {
    inner: Arc<Mutex<Vec<Resource>>>,
}

impl Leftovers {
    pub(crate) fn add(&self, r: Resource) {
        self.lock().push(r);
    }

    pub(crate) fn remove(&self, r: &Resource) {
        self.lock().retain(|x| x != r);
    }

    pub(crate) fn snapshot(&self) -> Vec<Resource> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Resource>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Order of deletion: servers first (a key in use by a server can still be deleted, but a server
/// is what costs money), then keys.
pub(crate) fn deletion_order(mut rs: Vec<Resource>) -> Vec<Resource> {
    rs.sort_by_key(|r| match r {
        Resource::Server { .. } => 0,
        Resource::SshKey { .. } => 1,
    });
    rs.dedup();
    rs
}

/// One line telling the user what is left and how to remove it.
pub(crate) fn left_behind_message(rs: &[Resource]) -> String {
    if rs.is_empty() {
        return "nothing was left behind".to_string();
    }
    let list: Vec<String> = rs.iter().map(|r| r.to_string()).collect();
    format!(
        "left behind: {}; delete them with `hcloud-nixos cleanup --older-than 0s`",
        list.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_message() {
        let k = Resource::SshKey {
            id: 1,
            name: "k".into(),
        };
        let s = Resource::Server {
            id: 2,
            name: "s".into(),
        };
        let o = deletion_order(vec![k.clone(), s.clone(), k.clone()]);
        assert_eq!(o, vec![s.clone(), k.clone()]);
        let m = left_behind_message(&o);
        assert_eq!(
            m,
            "left behind: server 2 (s), SSH key 1 (k); delete them with `hcloud-nixos cleanup --older-than 0s`"
        );
        assert_eq!(left_behind_message(&[]), "nothing was left behind");
    }

    #[test]
    fn registry() {
        let l = Leftovers::default();
        let s = Resource::Server {
            id: 2,
            name: "s".into(),
        };
        l.add(s.clone());
        assert_eq!(l.snapshot().len(), 1);
        l.remove(&s);
        assert!(l.snapshot().is_empty());
    }
}
