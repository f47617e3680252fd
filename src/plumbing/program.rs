//! How both programs run a command: logging, a runtime of one thread, one `error:` line at the end.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

/// Sets up logging, runs `command` to its end on a runtime of one thread and gives the exit code:
/// `Ok(true)` success, `Ok(false)` a failure the command has reported itself, `Err` printed as one
/// `error:` line (with `verbose`, the whole chain of causes).
pub fn run(verbose: bool, command: impl Future<Output = anyhow::Result<bool>>) -> ExitCode {
    super::logging::init(verbose);
    // One thread: the commands' work is I/O; an upload's reading, compression and hashing run on
    // threads of their own. Handing each SSH packet between the threads of a multi-threaded
    // runtime cost more CPU than encrypting it (README, "Benchmarks").
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(command);
    // Do not wait for a hashing thread that an interrupted upload left behind.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            if verbose {
                eprintln!("error: {e:?}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
