//! The Cloud API stand-in's fixed catalog: server types and locations, in the shapes of the
//! `server_type` and `location` objects of the recorded `create_server` answer
//! (tests/fixtures/hcloud-api/create_server.response201.example.json), with Hetzner's current
//! names and architectures.

use serde_json::{Value, json};

use super::fixture;

/// `(name, architecture, cores, memory GB, disk GB)`.
const TYPES: &[(&str, &str, u64, u64, u64)] = &[
    ("cx23", "x86", 2, 4, 40),
    ("cx33", "x86", 4, 8, 80),
    ("cpx22", "x86", 2, 4, 80),
    ("cax11", "arm", 2, 4, 40),
    ("cax21", "arm", 4, 8, 80),
];

/// `(name, city, country, network zone)`.
const LOCATIONS: &[(&str, &str, &str, &str)] = &[
    ("fsn1", "Falkenstein", "DE", "eu-central"),
    ("nbg1", "Nuremberg", "DE", "eu-central"),
    ("hel1", "Helsinki", "FI", "eu-central"),
];

fn recorded() -> Value {
    fixture("create_server.response201.example.json")["server"].clone()
}

/// One server type, by name.
pub(super) fn server_type(name: &str) -> Option<Value> {
    let (i, &(name, arch, cores, memory, disk)) =
        TYPES.iter().enumerate().find(|(_, t)| t.0 == name)?;
    let mut v = recorded()["server_type"].clone();
    v["id"] = json!(i + 1);
    v["name"] = json!(name);
    v["description"] = json!(name.to_uppercase());
    v["architecture"] = json!(arch);
    v["cores"] = json!(cores);
    v["memory"] = json!(memory);
    v["disk"] = json!(disk);
    v["deprecated"] = json!(false);
    v["deprecation"] = Value::Null;
    Some(v)
}

/// One location, by name.
pub(super) fn location(name: &str) -> Option<Value> {
    let (i, &(name, city, country, zone)) =
        LOCATIONS.iter().enumerate().find(|(_, l)| l.0 == name)?;
    let mut v = recorded()["location"].clone();
    v["id"] = json!(i + 1);
    v["name"] = json!(name);
    v["description"] = json!(format!("{city} DC Park 1"));
    v["city"] = json!(city);
    v["country"] = json!(country);
    v["network_zone"] = json!(zone);
    Some(v)
}

/// Every item of `server_types` or `locations`.
pub(super) fn all(key: &str) -> Vec<Value> {
    match key {
        "server_types" => TYPES.iter().filter_map(|t| server_type(t.0)).collect(),
        _ => LOCATIONS.iter().filter_map(|l| location(l.0)).collect(),
    }
}
