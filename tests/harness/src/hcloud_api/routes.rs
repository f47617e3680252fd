//! The Cloud API stand-in's answers: one function per endpoint family, on the state under its lock.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ActionRec, Effect, ImageRec, Inner, KeyRec, Method, ServerRec, catalog, fixture};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub(super) fn server_json(
    id: u64,
    name: &str,
    status: &str,
    labels: &BTreeMap<String, String>,
) -> Value {
    let mut s = fixture("create_server.response201.example.json")["server"].clone();
    s["id"] = json!(id);
    s["name"] = json!(name);
    s["status"] = json!(status);
    s["labels"] = json!(labels);
    s["public_net"]["ipv4"]["ip"] = json!("127.0.0.1");
    s["rescue_enabled"] = json!(false);
    s
}

fn action_json(a: &ActionRec) -> Value {
    let done = a.started.elapsed() >= a.duration;
    let mut v = fixture("poweron_server.response201.example.json")["action"].clone();
    v["id"] = json!(a.id);
    v["command"] = json!(a.command);
    v["resources"] = json!([{"id": a.resource.0, "type": a.resource.1}]);
    match (&a.fail, done) {
        (_, false) => {
            let pct = (a.started.elapsed().as_millis() * 100 / a.duration.as_millis().max(1))
                .min(99) as u64;
            v["status"] = json!("running");
            v["progress"] = json!(pct);
            v["finished"] = Value::Null;
            v["error"] = Value::Null;
        }
        (None, true) => {
            v["status"] = json!("success");
            v["progress"] = json!(100);
            v["finished"] = json!("2016-01-30T23:56:00Z");
            v["error"] = Value::Null;
        }
        (Some((code, message)), true) => {
            v["status"] = json!("error");
            v["progress"] = json!(100);
            v["error"] = json!({"code": code, "message": message});
        }
    }
    v
}

fn image_json(i: &ImageRec) -> Value {
    let mut v = fixture("create_image.response201.example.json")["image"].clone();
    v["id"] = json!(i.id);
    v["status"] = json!(i.status);
    v["description"] = json!(i.description);
    v["architecture"] = json!(i.architecture);
    v["labels"] = json!(i.labels);
    v["created_from"] = json!({"id": i.created_from, "name": "upload"});
    v["deprecated"] = Value::Null;
    v
}

fn key_json(k: &KeyRec) -> Value {
    json!({"id": k.id, "name": k.name, "fingerprint": "b7:2f:30:a0:2f:6c:58:6c:21:04:58:61:ba:06:3b:2f", "public_key": k.public_key, "labels": k.labels, "created": "2016-01-30T23:50:00Z"})
}

/// Completes due actions and applies their effects (a failed action has none).
pub(super) fn tick(s: &mut Inner) {
    let due: Vec<u64> = s
        .actions
        .values()
        .filter(|a| !a.applied && a.started.elapsed() >= a.duration)
        .map(|a| a.id)
        .collect();
    for id in due {
        let a = s.actions.get_mut(&id).unwrap();
        a.applied = true;
        if a.fail.is_some() {
            continue;
        }
        match a.effect.clone() {
            Effect::None => {}
            Effect::ServerStatus(sid, st) => {
                if let Some(srv) = s.servers.get_mut(&sid) {
                    srv.status = st.into();
                    srv.body["status"] = json!(st);
                }
            }
            Effect::ImageAvailable(iid) => {
                if let Some(i) = s.images.get_mut(&iid) {
                    i.status = "available".into();
                }
            }
        }
    }
}

/// Evaluates a label selector (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma = and).
pub fn matches_selector(labels: &BTreeMap<String, String>, sel: &str) -> bool {
    sel.split(',').filter(|t| !t.is_empty()).all(|term| {
        let term = term.trim();
        if let Some((k, v)) = term.split_once("!=") {
            labels.get(k).map(|x| x != v).unwrap_or(true)
        } else if let Some((k, v)) = term.split_once("==") {
            labels.get(k) == Some(&v.to_string())
        } else if let Some((k, v)) = term.split_once('=') {
            labels.get(k) == Some(&v.to_string())
        } else if let Some(k) = term.strip_prefix('!') {
            !labels.contains_key(k)
        } else {
            labels.contains_key(term)
        }
    })
}

fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(h, 16).unwrap_or(b'?'));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn page<T: Clone>(items: Vec<T>, q: &[(String, String)], max: usize) -> (Vec<T>, Value) {
    let get = |k: &str| q.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    let per_page = get("per_page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(25)
        .clamp(1, 50)
        .min(max);
    let page = get("page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let total = items.len();
    let last = total.div_ceil(per_page).max(1);
    let slice: Vec<T> = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    let meta = json!({"pagination": {
        "page": page,
        "per_page": per_page,
        "previous_page": if page > 1 { json!(page - 1) } else { Value::Null },
        "next_page": if page < last { json!(page + 1) } else { Value::Null },
        "last_page": last,
        "total_entries": total,
    }});
    (slice, meta)
}

pub(super) fn reply(
    s: &mut Inner,
    status: u16,
    body: Value,
    extra: &[(String, String)],
) -> Response {
    s.rate_remaining = s.rate_remaining.saturating_sub(1).max(1);
    let mut h = HeaderMap::new();
    h.insert("ratelimit-limit", HeaderValue::from_static("3600"));
    h.insert(
        "ratelimit-remaining",
        HeaderValue::from_str(&s.rate_remaining.to_string()).unwrap(),
    );
    h.insert(
        "ratelimit-reset",
        HeaderValue::from_str(&(unix_now() + 3600 - s.rate_remaining).to_string()).unwrap(),
    );
    for (k, v) in extra {
        h.insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let st = StatusCode::from_u16(status).unwrap();
    if status == 204 {
        return (st, h).into_response();
    }
    (st, h, axum::Json(body)).into_response()
}

pub(super) fn err(s: &mut Inner, status: u16, code: &str, message: &str) -> Response {
    reply(s, status, super::error_body(code, message), &[])
}

fn new_action(
    s: &mut Inner,
    command: &str,
    resource: (u64, &'static str),
    effect: Effect,
) -> Value {
    let id = s.id();
    let fail = s
        .failing_actions
        .iter()
        .position(|(c, _, _)| c == command)
        .map(|i| s.failing_actions.remove(i))
        .map(|(_, code, message)| (code, message));
    let a = ActionRec {
        id,
        command: command.into(),
        resource,
        started: Instant::now(),
        duration: s.action_duration,
        effect,
        applied: false,
        fail,
    };
    let v = action_json(&a);
    s.actions.insert(id, a);
    v
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(v["labels"].clone()).unwrap_or_default()
}

/// Hetzner's `invalid_input` naming the field that is wrong.
fn invalid_field(s: &mut Inner, field: &str, message: &str) -> Response {
    let body = json!({"error": {"code": "invalid_input", "message": format!("invalid input in field '{field}': {message}"),
        "details": {"fields": [{"name": field, "messages": [message]}]}}});
    reply(s, 422, body, &[])
}

fn invalid(s: &mut Inner) -> Response {
    let b = fixture("error.invalid_input.example.json");
    reply(s, 422, b, &[])
}

/// The answer to one authorized request (faults aside).
pub(super) fn route(
    s: &mut Inner,
    method: &Method,
    path: &str,
    query: &str,
    body: &Value,
) -> Response {
    let Some(rest) = path.strip_prefix("/v1") else {
        return err(s, 404, "not_found", "no such endpoint");
    };
    let parts: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let q = query_pairs(query);
    let max_per_page = s.max_per_page;
    match parts.as_slice() {
        ["ssh_keys", ..] => ssh_keys(s, method, &parts[1..], &q, body),
        ["servers", id, "actions", action] if *method == Method::POST => {
            let id = id.parse().unwrap_or(0);
            server_action(s, id, action, body)
        }
        ["servers", ..] => servers(s, method, &parts[1..], &q, body),
        ["actions", id] if *method == Method::GET => {
            let id: u64 = id.parse().unwrap_or(0);
            match s.actions.get(&id) {
                Some(a) => {
                    let v = json!({"action": action_json(a)});
                    reply(s, 200, v, &[])
                }
                None => err(s, 404, "not_found", "action not found"),
            }
        }
        ["images", ..] => images(s, method, &parts[1..], &q, body),
        ["server_types"] | ["locations"] if *method == Method::GET => {
            let key = parts[0];
            let name = qget(&q, "name");
            let items: Vec<Value> = catalog::all(key)
                .into_iter()
                .filter(|v| name.as_deref().is_none_or(|n| v["name"] == n))
                .collect();
            let (items, meta) = page(items, &q, max_per_page);
            reply(s, 200, json!({ key: items, "meta": meta }), &[])
        }
        _ => err(s, 404, "not_found", "no such endpoint"),
    }
}

fn qget(q: &[(String, String)], k: &str) -> Option<String> {
    q.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone())
}

fn ssh_keys(
    s: &mut Inner,
    method: &Method,
    rest: &[&str],
    q: &[(String, String)],
    body: &Value,
) -> Response {
    let max = s.max_per_page;
    match (method.clone(), rest) {
        (Method::POST, []) => {
            let name = body["name"].as_str().unwrap_or("").to_string();
            let pk = body["public_key"].as_str().unwrap_or("").to_string();
            if name.is_empty() || !pk.starts_with("ssh-") {
                return invalid(s);
            }
            if s.keys
                .values()
                .any(|k| k.name == name || k.public_key == pk)
            {
                let b = fixture("error.uniqueness_error.example.json");
                return reply(s, 409, b, &[]);
            }
            let id = s.id();
            let k = KeyRec {
                id,
                name,
                public_key: pk,
                labels: labels_of(body),
            };
            let v = json!({"ssh_key": key_json(&k)});
            s.keys.insert(id, k);
            reply(s, 201, v, &[])
        }
        (Method::GET, []) => {
            let sel = qget(q, "label_selector").unwrap_or_default();
            let items: Vec<Value> = s
                .keys
                .values()
                .filter(|k| matches_selector(&k.labels, &sel))
                .map(key_json)
                .collect();
            let (items, meta) = page(items, q, max);
            reply(s, 200, json!({"ssh_keys": items, "meta": meta}), &[])
        }
        (Method::PUT, [id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            let Some(k) = s.keys.get_mut(&id) else {
                return err(s, 404, "not_found", "SSH key not found");
            };
            if body.get("labels").is_some() {
                k.labels = labels_of(body);
            }
            let v = json!({"ssh_key": key_json(k)});
            reply(s, 200, v, &[])
        }
        (Method::DELETE, [id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            if s.keys.remove(&id).is_some() {
                reply(s, 204, Value::Null, &[])
            } else {
                err(s, 404, "not_found", "SSH key not found")
            }
        }
        _ => err(s, 404, "not_found", "no such endpoint"),
    }
}

fn create_server(s: &mut Inner, body: &Value) -> Response {
    let name = body["name"].as_str().unwrap_or("").to_string();
    // The image by name (`debian-12`, as upload asks) or by ID (a snapshot, as create asks).
    let image_ok = body["image"].is_string() || body["image"].is_u64();
    if name.is_empty() || body["server_type"].as_str().is_none() || !image_ok {
        return invalid(s);
    }
    let st = body["server_type"].as_str().unwrap_or("");
    if catalog::server_type(st).is_none() {
        return invalid_field(s, "server_type", &format!("server type {st} not found"));
    }
    if let Some(l) = body["location"].as_str()
        && catalog::location(l).is_none()
    {
        return invalid_field(s, "location", &format!("location {l} not found"));
    }
    if let Some(id) = body["image"].as_u64() {
        match s.images.get(&id) {
            Some(i) if i.status == "available" => {}
            _ => return invalid_field(s, "image", &format!("image {id} not found")),
        }
    }
    let keys: Vec<u64> = body["ssh_keys"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    if let Some(k) = keys.iter().find(|k| !s.keys.contains_key(k)) {
        return invalid_field(s, "ssh_keys", &format!("SSH key {k} not found"));
    }
    if body.get("datacenter").is_some() {
        let b = fixture("error.deprecated_api_endpoint.example.json");
        return reply(s, 410, b, &[]);
    }
    if s.servers.values().any(|x| x.name == name) {
        // The recorded shape (its example is about an SSH key), for the server's name.
        let mut b = fixture("error.uniqueness_error.example.json");
        b["error"]["message"] = json!("server name is already used");
        b["error"]["details"]["fields"] = json!([{"name": "name"}]);
        return reply(s, 409, b, &[]);
    }
    let id = s.id();
    let labels = labels_of(body);
    let start = body["start_after_create"].as_bool().unwrap_or(true);
    let mut sbody = server_json(id, &name, "initializing", &labels);
    sbody["server_type"] = catalog::server_type(st).unwrap_or_default();
    if let Some(l) = body["location"].as_str().and_then(catalog::location) {
        sbody["location"] = l;
    }
    if let Some(img) = body["image"].as_u64().and_then(|i| s.images.get(&i)) {
        sbody["image"] = image_json(img);
    }
    s.servers.insert(
        id,
        ServerRec {
            id,
            name: name.clone(),
            status: "initializing".into(),
            labels,
            rescue_keys: vec![],
            body: sbody.clone(),
        },
    );
    // In a local cloud, a started server is a machine that boots: the cloud says when it runs.
    let boots = start && s.machines.is_some();
    let effect = if boots {
        Effect::None
    } else {
        Effect::ServerStatus(id, if start { "running" } else { "off" })
    };
    let a = new_action(s, "create_server", (id, "server"), effect);
    if boots {
        s.send(super::Event::Boot(super::Boot {
            id,
            name,
            user_data: body["user_data"].as_str().unwrap_or("").to_string(),
            ssh_keys: keys
                .iter()
                .filter_map(|k| s.keys.get(k).map(|k| k.public_key.clone()))
                .collect(),
        }));
    }
    let mut v = fixture("create_server.response201.example.json");
    v["server"] = sbody;
    v["action"] = a;
    v["next_actions"] = json!([]);
    reply(s, 201, v, &[])
}

fn servers(
    s: &mut Inner,
    method: &Method,
    rest: &[&str],
    q: &[(String, String)],
    body: &Value,
) -> Response {
    let max = s.max_per_page;
    match (method.clone(), rest) {
        (Method::POST, []) => create_server(s, body),
        (Method::GET, []) => {
            let sel = qget(q, "label_selector").unwrap_or_default();
            let items: Vec<Value> = s
                .servers
                .values()
                .filter(|x| matches_selector(&x.labels, &sel))
                .map(|x| x.body.clone())
                .collect();
            let (items, meta) = page(items, q, max);
            reply(s, 200, json!({"servers": items, "meta": meta}), &[])
        }
        (Method::GET, [id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            match s.servers.get(&id) {
                Some(x) => {
                    let v = json!({"server": x.body});
                    reply(s, 200, v, &[])
                }
                None => err(s, 404, "not_found", "server not found"),
            }
        }
        (Method::GET, [id, "actions"]) => {
            let id: u64 = id.parse().unwrap_or(0);
            if !s.servers.contains_key(&id) {
                return err(s, 404, "not_found", "server not found");
            }
            let mut items: Vec<Value> = s
                .actions
                .values()
                .filter(|a| a.resource == (id, "server"))
                .map(action_json)
                .collect();
            if qget(q, "sort").as_deref() == Some("id:desc") {
                items.reverse();
            }
            let (items, meta) = page(items, q, max);
            reply(s, 200, json!({"actions": items, "meta": meta}), &[])
        }
        (Method::PUT, [id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            let Some(x) = s.servers.get_mut(&id) else {
                return err(s, 404, "not_found", "server not found");
            };
            if body.get("labels").is_some() {
                x.labels = labels_of(body);
                x.body["labels"] = json!(x.labels);
            }
            let v = json!({"server": x.body});
            reply(s, 200, v, &[])
        }
        (Method::DELETE, [id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            if s.servers.remove(&id).is_some() {
                clear_authorized_keys(s);
                s.send(super::Event::Delete(id));
                let a = new_action(s, "delete_server", (id, "server"), Effect::None);
                reply(s, 200, json!({"action": a}), &[])
            } else {
                err(s, 404, "not_found", "server not found")
            }
        }
        _ => err(s, 404, "not_found", "no such endpoint"),
    }
}

fn server_action(s: &mut Inner, id: u64, action: &str, body: &Value) -> Response {
    let Some(srv) = s.servers.get(&id).cloned() else {
        return err(s, 404, "not_found", "server not found");
    };
    if s.actions
        .values()
        .any(|a| a.resource.0 == id && a.started.elapsed() < a.duration)
    {
        return err(
            s,
            423,
            "locked",
            "the server is locked: an action is running",
        );
    }
    match action {
        "enable_rescue" => {
            let keys: Vec<u64> = body["ssh_keys"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                .unwrap_or_default();
            if body["type"] != "linux64" || keys.iter().any(|k| !s.keys.contains_key(k)) {
                return invalid(s);
            }
            let x = s.servers.get_mut(&id).unwrap();
            x.rescue_keys = keys;
            x.body["rescue_enabled"] = json!(true);
            let a = new_action(s, "enable_rescue", (id, "server"), Effect::None);
            let mut v = fixture("enable_rescue.response201.example.json");
            v["action"] = a;
            reply(s, 201, v, &[])
        }
        "poweron" => {
            if srv.body["rescue_enabled"] == json!(true) {
                let pubkeys: Vec<String> = srv
                    .rescue_keys
                    .iter()
                    .filter_map(|k| s.keys.get(k).map(|k| k.public_key.clone()))
                    .collect();
                if let Some(path) = s.authorized_keys.clone() {
                    let delay = s.ssh_ready_after;
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = std::fs::write(&path, pubkeys.join("\n") + "\n");
                    });
                }
            }
            let effect = Effect::ServerStatus(id, "running");
            let a = new_action(s, "start_server", (id, "server"), effect);
            reply(s, 201, json!({"action": a}), &[])
        }
        "poweroff" => {
            clear_authorized_keys(s);
            s.send(super::Event::PowerOff(id));
            let effect = Effect::ServerStatus(id, "off");
            let a = new_action(s, "stop_server", (id, "server"), effect);
            reply(s, 201, json!({"action": a}), &[])
        }
        "create_image" => {
            if body["type"] != "snapshot" {
                return invalid(s);
            }
            let iid = s.id();
            let arch = srv.body["server_type"]["architecture"]
                .as_str()
                .unwrap_or("x86")
                .to_string();
            let img = ImageRec {
                id: iid,
                status: "creating".into(),
                description: body["description"].as_str().unwrap_or("").into(),
                architecture: arch,
                labels: labels_of(body),
                created_from: id,
            };
            let ij = image_json(&img);
            s.images.insert(iid, img);
            let effect = Effect::ImageAvailable(iid);
            let a = new_action(s, "create_image", (id, "server"), effect);
            reply(s, 201, json!({"image": ij, "action": a}), &[])
        }
        _ => err(s, 404, "not_found", "no such action"),
    }
}

fn images(
    s: &mut Inner,
    method: &Method,
    rest: &[&str],
    q: &[(String, String)],
    body: &Value,
) -> Response {
    let max = s.max_per_page;
    match (method.clone(), rest) {
        (Method::GET, []) => {
            let sel = qget(q, "label_selector").unwrap_or_default();
            let ty = qget(q, "type");
            let arch = qget(q, "architecture");
            let status = qget(q, "status");
            let items: Vec<Value> = s
                .images
                .values()
                .filter(|i| matches_selector(&i.labels, &sel))
                .filter(|_| ty.as_deref().is_none_or(|t| t == "snapshot"))
                .filter(|i| arch.as_deref().is_none_or(|a| a == i.architecture))
                .filter(|i| status.as_deref().is_none_or(|st| st == i.status))
                .map(image_json)
                .collect();
            // IDs grow with creation time: `created:desc` is the reverse order.
            let mut items = items;
            if qget(q, "sort")
                .is_some_and(|o| o.starts_with("created:desc") || o.starts_with("id:desc"))
            {
                items.reverse();
            }
            let (items, meta) = page(items, q, max);
            reply(s, 200, json!({"images": items, "meta": meta}), &[])
        }
        (Method::GET, [id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            match s.images.get(&id) {
                Some(i) => {
                    let v = json!({"image": image_json(i)});
                    reply(s, 200, v, &[])
                }
                None => err(s, 404, "not_found", "image not found"),
            }
        }
        (Method::PUT, [id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            let Some(i) = s.images.get_mut(&id) else {
                return err(s, 404, "not_found", "image not found");
            };
            if body.get("labels").is_some() {
                i.labels = labels_of(body);
            }
            if let Some(d) = body["description"].as_str() {
                i.description = d.to_string();
            }
            let v = json!({"image": image_json(i)});
            reply(s, 200, v, &[])
        }
        (Method::DELETE, [id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            if s.images.remove(&id).is_some() {
                reply(s, 204, Value::Null, &[])
            } else {
                err(s, 404, "not_found", "image not found")
            }
        }
        _ => err(s, 404, "not_found", "no such endpoint"),
    }
}

fn clear_authorized_keys(s: &Inner) {
    if let Some(p) = &s.authorized_keys {
        let _ = std::fs::write(p, "");
    }
}
