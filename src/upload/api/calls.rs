//! The typed calls: SSH keys, servers and their actions, images, labels; each call that creates or starts something with its lookup for a lost answer.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{
    Action, ApiError, Client, Image, Server, SshKey, action_command, list_query, next_page, take,
};

/// Pages read at most by one list call (50 items each).
const MAX_PAGES: u64 = 200;

/// The kinds of resource whose labels the client sets, by their path in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Server,
    SshKey,
    Image,
}

impl Kind {
    pub(crate) fn path(self) -> &'static str {
        match self {
            Kind::Server => "servers",
            Kind::SshKey => "ssh_keys",
            Kind::Image => "images",
        }
    }
}

fn not_found_is_gone<T>(r: Result<T, ApiError>) -> Result<Option<T>, ApiError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.code() == Some("not_found") => Ok(None),
        Err(e) => Err(e),
    }
}

impl Client {
    /// Every item of a paginated list, following `meta.pagination.next_page` (at most 200 pages).
    pub(crate) async fn list_all<T: DeserializeOwned>(
        &self,
        path: &str,
        key: &str,
        filters: &[(&str, &str)],
    ) -> Result<Vec<T>, ApiError> {
        let mut out = Vec::new();
        let mut page = 1u64;
        for _ in 0..MAX_PAGES {
            let q = list_query(filters, page, 50);
            let mut v = self.call(Method::GET, path, &q, None).await?;
            let items: Vec<T> = take(path, &mut v, key)?;
            out.extend(items);
            match next_page(&v, page) {
                Some(n) => page = n,
                None => return Ok(out),
            }
        }
        Ok(out)
    }

    /// Creates an SSH key carrying `labels`; `selector` finds it again after a lost answer.
    pub(crate) async fn create_ssh_key(
        &self,
        name: &str,
        public_key: &str,
        labels: &BTreeMap<String, String>,
        selector: &str,
    ) -> Result<SshKey, ApiError> {
        let body = json!({"name": name, "public_key": public_key, "labels": labels});
        self.post_once(
            "/ssh_keys",
            &body,
            |mut v| take("POST /ssh_keys", &mut v, "ssh_key"),
            async || Ok(self.list_ssh_keys(selector).await?.into_iter().next()),
        )
        .await
    }

    pub(crate) async fn delete_ssh_key(&self, id: u64) -> Result<(), ApiError> {
        let path = format!("/ssh_keys/{id}");
        not_found_is_gone(self.call(Method::DELETE, &path, &[], None).await).map(|_| ())
    }

    /// Creates a server; returns it and its creation action (`None` when the answer was lost
    /// and the server was found by `selector`: wait for its status then).
    pub(crate) async fn create_server(
        &self,
        body: &Value,
        selector: &str,
    ) -> Result<(Server, Option<Action>), ApiError> {
        self.post_once(
            "/servers",
            body,
            |mut v| {
                let s = take("POST /servers", &mut v, "server")?;
                let a = take("POST /servers", &mut v, "action")?;
                Ok((s, Some(a)))
            },
            async || {
                let found = self.list_servers(selector).await?.into_iter().next();
                Ok(found.map(|s| (s, None)))
            },
        )
        .await
    }

    pub(crate) async fn get_server(&self, id: u64) -> Result<Server, ApiError> {
        let path = format!("/servers/{id}");
        let mut v = self.call(Method::GET, &path, &[], None).await?;
        take(&path, &mut v, "server")
    }

    /// Deletes a server; `Ok(None)` when it is gone already.
    pub(crate) async fn delete_server(&self, id: u64) -> Result<Option<Action>, ApiError> {
        let path = format!("/servers/{id}");
        let answer = not_found_is_gone(self.call(Method::DELETE, &path, &[], None).await)?;
        Ok(answer.and_then(|mut v| take(&path, &mut v, "action").ok()))
    }

    /// The server's latest actions, newest first (one page).
    pub(crate) async fn server_actions(&self, id: u64) -> Result<Vec<Action>, ApiError> {
        let path = format!("/servers/{id}/actions");
        let q = list_query(&[("sort", "id:desc")], 1, 50);
        let mut v = self.call(Method::GET, &path, &q, None).await?;
        take(&path, &mut v, "actions")
    }

    /// Starts a server action (`poweron`, `enable_rescue`, ...). After a lost answer the
    /// server's newest action of that kind is taken for it: the temporary servers get each kind
    /// once.
    pub(crate) async fn server_action(
        &self,
        id: u64,
        action: &str,
        body: Option<&Value>,
    ) -> Result<Action, ApiError> {
        let path = format!("/servers/{id}/actions/{action}");
        let empty = json!({});
        let command = action_command(action);
        self.post_once(
            &path,
            body.unwrap_or(&empty),
            |mut v| take(&path, &mut v, "action"),
            async || {
                let actions = self.server_actions(id).await?;
                Ok(actions.into_iter().find(|a| a.command == command))
            },
        )
        .await
    }

    /// Snapshots a server's disk; returns the image's ID and the action (`None` when the answer
    /// was lost and the image was found by `selector`: wait for its status then).
    pub(crate) async fn create_image(
        &self,
        server: u64,
        body: &Value,
        selector: &str,
    ) -> Result<(u64, Option<Action>), ApiError> {
        let path = format!("/servers/{server}/actions/create_image");
        self.post_once(
            &path,
            body,
            |mut v| {
                let image: Image = take(&path, &mut v, "image")?;
                let action = take(&path, &mut v, "action")?;
                Ok((image.id, Some(action)))
            },
            async || {
                let found = self
                    .list_images(&[("type", "snapshot"), ("label_selector", selector)])
                    .await?;
                Ok(found.into_iter().next().map(|i| (i.id, None)))
            },
        )
        .await
    }

    pub(crate) async fn get_action(&self, id: u64) -> Result<Action, ApiError> {
        let path = format!("/actions/{id}");
        let mut v = self.call(Method::GET, &path, &[], None).await?;
        take(&path, &mut v, "action")
    }

    /// Polls an action until it succeeds, fails, or `deadline` passes.
    pub(crate) async fn wait_action(
        &self,
        action: &Action,
        deadline: Duration,
    ) -> Result<(), ApiError> {
        let what = format!("action {} ({})", action.id, action.command);
        self.poll(&what, deadline, async |n| {
            let a = if n == 1 {
                action.clone()
            } else {
                self.get_action(action.id).await?
            };
            match a.status.as_str() {
                "success" => Ok(Some(())),
                "error" => {
                    let (code, message) = a
                        .error
                        .map(|e| (e.code, e.message))
                        .unwrap_or_else(|| ("action_failed".into(), "no details".into()));
                    Err(ApiError::ActionFailed {
                        id: a.id,
                        command: a.command,
                        code: crate::upload::outside::one_line(&code, 64),
                        message: crate::upload::outside::one_line(&message, 300),
                    })
                }
                _ => Ok(None),
            }
        })
        .await
    }

    pub(crate) async fn list_images(
        &self,
        filters: &[(&str, &str)],
    ) -> Result<Vec<Image>, ApiError> {
        self.list_all("/images", "images", filters).await
    }

    pub(crate) async fn get_image(&self, id: u64) -> Result<Image, ApiError> {
        let path = format!("/images/{id}");
        let mut v = self.call(Method::GET, &path, &[], None).await?;
        take(&path, &mut v, "image")
    }

    pub(crate) async fn delete_image(&self, id: u64) -> Result<(), ApiError> {
        let path = format!("/images/{id}");
        not_found_is_gone(self.call(Method::DELETE, &path, &[], None).await).map(|_| ())
    }

    pub(crate) async fn list_servers(&self, label_selector: &str) -> Result<Vec<Server>, ApiError> {
        self.list_all("/servers", "servers", &[("label_selector", label_selector)])
            .await
    }

    pub(crate) async fn list_ssh_keys(
        &self,
        label_selector: &str,
    ) -> Result<Vec<SshKey>, ApiError> {
        self.list_all(
            "/ssh_keys",
            "ssh_keys",
            &[("label_selector", label_selector)],
        )
        .await
    }

    /// Replaces a resource's labels; `Ok(false)` when it is gone.
    pub(crate) async fn set_labels(
        &self,
        kind: Kind,
        id: u64,
        labels: &BTreeMap<String, String>,
    ) -> Result<bool, ApiError> {
        let path = format!("/{}/{id}", kind.path());
        let body = json!({ "labels": labels });
        let answer = self.call(Method::PUT, &path, &[], Some(&body)).await;
        Ok(not_found_is_gone(answer)?.is_some())
    }
}
