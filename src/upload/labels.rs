//! Label names, label validation and label selectors that mark what the uploader creates.

use std::collections::BTreeMap;

/// Prefix of every label the uploader sets.
pub(crate) const PREFIX: &str = "hcloud-nixos";
/// Present on temporary servers and SSH keys; `cleanup` looks for it.
pub(crate) const TEMPORARY: &str = "hcloud-nixos/temporary";
/// The run that created a temporary resource (random per invocation).
pub(crate) const RUN: &str = "hcloud-nixos/run";
/// Which of the run's images (0, 1, ...) a temporary resource is for.
pub(crate) const JOB: &str = "hcloud-nixos/job";
/// Unix time (seconds) at which a temporary resource was created.
pub(crate) const CREATED_AT: &str = "hcloud-nixos/created-at";
/// Unix time (seconds) until which the run that created a temporary resource is known to be
/// alive: the run moves it forward while it runs, and `cleanup` leaves the resources of a live
/// run alone.
pub(crate) const LIVE_UNTIL: &str = "hcloud-nixos/live-until";
/// On snapshots: the SHA-256 of the raw image, hex, cut to the 63 characters a label value may hold.
pub(crate) const IMAGE_SHA256: &str = "hcloud-nixos/image-sha256";
/// On snapshots: the raw image's size in bytes.
pub(crate) const IMAGE_SIZE: &str = "hcloud-nixos/image-size";

/// Longest label value Hetzner accepts.
pub(crate) const MAX_VALUE_LEN: usize = 63;

/// The value of the content-hash label for a raw image with this SHA-256 (hex).
pub(crate) fn hash_label_value(sha256_hex: &str) -> String {
    sha256_hex
        .chars()
        .take(MAX_VALUE_LEN)
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Labels on a temporary resource (a server, an SSH key, a snapshot until it is done) of image
/// `job` of a run.
pub(crate) fn temporary_labels(
    run_id: &str,
    job: usize,
    created_at_unix: u64,
    live_until_unix: u64,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (TEMPORARY.to_string(), "true".to_string()),
        (RUN.to_string(), run_id.to_string()),
        (JOB.to_string(), job.to_string()),
        (CREATED_AT.to_string(), created_at_unix.to_string()),
        (LIVE_UNTIL.to_string(), live_until_unix.to_string()),
    ])
}

/// The same labels with the lease moved to `until_unix`.
pub(crate) fn with_live_until(
    labels: &BTreeMap<String, String>,
    until_unix: u64,
) -> BTreeMap<String, String> {
    let mut l = labels.clone();
    l.insert(LIVE_UNTIL.to_string(), until_unix.to_string());
    l
}

/// Selector for every temporary resource of any run.
pub(crate) fn temporary_selector() -> String {
    format!("{TEMPORARY}=true")
}

/// Selector for the temporary resources of one run.
pub(crate) fn run_selector(run_id: &str) -> String {
    format!("{TEMPORARY}=true,{RUN}={run_id}")
}

/// Selector for the temporary resources of one image of a run (at most one of each kind).
pub(crate) fn job_selector(run_id: &str, job: usize) -> String {
    format!("{TEMPORARY}=true,{RUN}={run_id},{JOB}={job}")
}

/// Selector for finished snapshots of a raw image with this SHA-256.
pub(crate) fn image_selector(sha256_hex: &str) -> String {
    format!(
        "{IMAGE_SHA256}={},!{TEMPORARY}",
        hash_label_value(sha256_hex)
    )
}

/// The run a temporary resource belongs to.
pub(crate) fn run_of(labels: &BTreeMap<String, String>) -> Option<&str> {
    labels.get(RUN).map(String::as_str)
}

/// The image of the run a temporary resource is for.
pub(crate) fn job_of(labels: &BTreeMap<String, String>) -> Option<usize> {
    labels.get(JOB)?.parse().ok()
}

/// Until when the run of a temporary resource is known to be alive, if it says.
pub(crate) fn live_until(labels: &BTreeMap<String, String>) -> Option<u64> {
    labels.get(LIVE_UNTIL)?.parse().ok()
}

/// Labels on the finished snapshot: the user's, then ours (ours win). Until it is done it carries
/// [`temporary_labels`] too.
pub(crate) fn snapshot_labels(
    user: &BTreeMap<String, String>,
    sha256_hex: &str,
    size: u64,
) -> BTreeMap<String, String> {
    let mut labels = user.clone();
    labels.insert(IMAGE_SHA256.to_string(), hash_label_value(sha256_hex));
    labels.insert(IMAGE_SIZE.to_string(), size.to_string());
    labels
}

/// Whether a temporary resource with these labels is older than `min_age_secs` at `now_unix`.
/// A resource without a readable `created-at` label counts as old: only `cleanup` asks, and
/// such a resource was not made by a run in progress of this version.
pub(crate) fn is_stale(
    labels: &BTreeMap<String, String>,
    now_unix: u64,
    min_age_secs: u64,
) -> bool {
    match labels.get(CREATED_AT).and_then(|v| v.parse::<u64>().ok()) {
        Some(created) => now_unix.saturating_sub(created) >= min_age_secs,
        None => true,
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn valid_name_or_value(s: &str, allow_empty: bool) -> bool {
    if s.is_empty() {
        return allow_empty;
    }
    let first = s.chars().next().unwrap_or(' ');
    let last = s.chars().last().unwrap_or(' ');
    s.len() <= MAX_VALUE_LEN
        && first.is_ascii_alphanumeric()
        && last.is_ascii_alphanumeric()
        && s.chars().all(is_name_char)
}

fn valid_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Parses one `--label key=value` argument, checking Hetzner's label rules.
pub(crate) fn parse_label(arg: &str) -> Result<(String, String), String> {
    let (key, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("label '{arg}' has no '=': write it as key=value"))?;
    let name = match key.rsplit_once('/') {
        Some((prefix, name)) => {
            if !valid_dns_subdomain(prefix) {
                return Err(format!(
                    "label key '{key}': the prefix before '/' must be a DNS subdomain"
                ));
            }
            if prefix == "hetzner.cloud" {
                return Err(format!(
                    "label key '{key}': the prefix hetzner.cloud/ is reserved by Hetzner"
                ));
            }
            if prefix == PREFIX {
                return Err(format!(
                    "label key '{key}': the prefix {PREFIX}/ is set by the uploader itself"
                ));
            }
            name
        }
        None => key,
    };
    if !valid_name_or_value(name, false) {
        return Err(format!(
            "label key '{key}': the name must be 1 to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    if !valid_name_or_value(value, true) {
        return Err(format!(
            "label '{key}': the value must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn hash_label_fits_a_label_value() {
        let v = hash_label_value(HASH);
        assert_eq!(v.len(), 63);
        assert!(HASH.starts_with(&v));
        assert!(valid_name_or_value(&v, false));
    }

    #[test]
    fn leases_and_jobs() {
        let l = temporary_labels("r", 3, 1000, 2000);
        assert_eq!(live_until(&l), Some(2000));
        assert_eq!(live_until(&with_live_until(&l, 2600)), Some(2600));
        assert_eq!(job_of(&l), Some(3));
        assert_eq!(run_of(&l), Some("r"));
        assert_eq!(live_until(&BTreeMap::new()), None);
        let bad = BTreeMap::from([(LIVE_UNTIL.to_string(), "-1".to_string())]);
        assert_eq!(live_until(&bad), None);
    }

    #[test]
    fn selectors() {
        assert_eq!(temporary_selector(), "hcloud-nixos/temporary=true");
        assert_eq!(
            run_selector("abc"),
            "hcloud-nixos/temporary=true,hcloud-nixos/run=abc"
        );
        assert_eq!(
            image_selector(HASH),
            format!(
                "hcloud-nixos/image-sha256={},!hcloud-nixos/temporary",
                &HASH[..63]
            )
        );
        assert_eq!(
            job_selector("abc", 1),
            "hcloud-nixos/temporary=true,hcloud-nixos/run=abc,hcloud-nixos/job=1"
        );
    }

    #[test]
    fn snapshot_labels_keep_user_labels_and_add_hash() {
        let user = BTreeMap::from([("env".to_string(), "prod".to_string())]);
        let l = snapshot_labels(&user, HASH, 42);
        assert_eq!(l["env"], "prod");
        assert_eq!(l[IMAGE_SHA256], &HASH[..63]);
        assert_eq!(l[IMAGE_SIZE], "42");
    }

    #[test]
    fn staleness() {
        let l = temporary_labels("r", 0, 1000, 2000);
        assert!(!is_stale(&l, 1500, 1800));
        assert!(is_stale(&l, 2800, 1800));
        assert!(is_stale(&l, 1000, 0));
        assert!(is_stale(&BTreeMap::new(), 0, 1800));
    }

    #[test]
    fn label_parsing() {
        assert_eq!(
            parse_label("env=prod").unwrap(),
            ("env".into(), "prod".into())
        );
        assert_eq!(
            parse_label("example.com/my=label").unwrap(),
            ("example.com/my".into(), "label".into())
        );
        assert_eq!(parse_label("just-a-key=").unwrap().1, "");
        assert!(parse_label("novalue").unwrap_err().contains("no '='"));
        assert!(
            parse_label("hetzner.cloud/x=y")
                .unwrap_err()
                .contains("reserved")
        );
        assert!(parse_label("hcloud-nixos/x=y").is_err());
        assert!(parse_label("-bad=y").is_err());
        assert!(parse_label("k=bad-").is_err());
        assert!(parse_label(&format!("k={}", "a".repeat(64))).is_err());
        assert!(parse_label("bad_prefix/k=v").is_err());
    }
}
