//! What a run reports at the end: snapshot IDs (or JSON) on stdout, and an error that names every failure and everything left behind with the command that removes it.

use serde_json::{Value, json};

use super::flow::Ctx;
use super::leftovers::left_behind_message;
use super::{Job, source};

/// Each upload's result: its outcome, or why it has none (`interrupted` when it never ended).
fn per_job(ctx: &Ctx, jobs: &[Job]) -> Vec<Result<super::flow::Outcome, String>> {
    let results = ctx.results.lock().unwrap_or_else(|e| e.into_inner());
    jobs.iter()
        .map(|j| {
            results
                .get(j.index)
                .cloned()
                .flatten()
                .unwrap_or_else(|| Err("interrupted".to_string()))
        })
        .collect()
}

/// The snapshot IDs of the uploads that succeeded, one a line; with `--json` one entry per
/// image, in order, each with what it left behind.
pub(crate) fn print(ctx: &Ctx, jobs: &[Job], interrupted: bool) {
    let results = per_job(ctx, jobs);
    if !ctx.args.json {
        for o in results.iter().flatten() {
            println!("{}", o.snapshot_id);
        }
        return;
    }
    let entries: Vec<Value> = jobs
        .iter()
        .zip(&results)
        .map(|(j, r)| {
            let left = ctx.leftovers.of_job(j.index);
            let mut v = match r {
                Ok(o) => serde_json::to_value(o).unwrap_or(Value::Null),
                Err(e) => json!({
                    "image": j.image,
                    "architecture": j.architecture,
                    "error": if interrupted && e == "interrupted" { "interrupted" } else { e },
                }),
            };
            v["left_behind"] = serde_json::to_value(left).unwrap_or(Value::Null);
            v
        })
        .collect();
    match serde_json::to_string_pretty(&entries) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("cannot write the results as JSON: {e}"),
    }
}

/// Success when every upload succeeded and nothing was left behind; otherwise one error naming
/// the failures and what is left.
pub(crate) fn verdict(ctx: &Ctx, jobs: &[Job], interrupted: bool) -> anyhow::Result<()> {
    let left = ctx.leftovers.snapshot();
    let left_msg = left_behind_message(&left, &ctx.run_id);
    if interrupted {
        if left.is_empty() {
            anyhow::bail!("interrupted; cleaned up, nothing was left behind");
        }
        anyhow::bail!("interrupted; {left_msg}");
    }
    let mut errors: Vec<String> = jobs
        .iter()
        .zip(per_job(ctx, jobs))
        .filter_map(|(j, r)| {
            r.err()
                .map(|e| format!("{}: {e}", source::display_name(&j.image)))
        })
        .collect();
    let mut msg = match errors.len() {
        0 => String::new(),
        1 => errors.remove(0),
        n => format!("{n} uploads failed: {}", errors.join("; ")),
    };
    if !left.is_empty() {
        if msg.is_empty() {
            msg = "the snapshots are made, but the temporary resources could not all be deleted"
                .to_string();
        }
        msg = format!("{msg}; {left_msg}");
    }
    if msg.is_empty() {
        return Ok(());
    }
    Err(anyhow::Error::msg(msg))
}
