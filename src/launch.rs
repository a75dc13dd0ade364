//! `pipeline run --nproc-per-node N`: a local launcher, as `torchrun --nproc_per_node N` is. It
//! starts N copies of this binary with the same arguments (less `--nproc-per-node`) and the
//! variables torchrun sets — `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR=127.0.0.1`, `MASTER_PORT` (a free port) — shows rank 0's output as its own and
//! the other ranks' stderr prefixed `[rank N]` (their stdout is dropped: rank 0 reports the run),
//! waits for all of them, and when one fails stops the others and exits with an error naming the
//! rank and its exit status.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::common::{Exit, Usage};

/// The command line without `--nproc-per-node N` / `--nproc-per-node=N`.
fn child_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--nproc-per-node" {
            it.next();
        } else if !a.starts_with("--nproc-per-node=") {
            out.push(a.clone());
        }
    }
    out
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(c) => format!("exit status {c}"),
        None => {
            #[cfg(unix)]
            {
                use std::os::unix::process::ExitStatusExt;
                if let Some(sig) = status.signal() {
                    return format!("killed by signal {sig}");
                }
            }
            status.to_string()
        }
    }
}

/// Run `nproc` ranks of this command and wait for them.
pub fn launch(nproc: usize) -> anyhow::Result<()> {
    for v in ["WORLD_SIZE", "RANK"] {
        if std::env::var(v).is_ok_and(|w| !w.is_empty() && w != "1" && !(v == "RANK" && w == "0")) {
            return Err(Usage(format!(
                "--nproc-per-node starts its own ranks, but {v} is already set (an outer launcher started this process); use one or the other"
            ))
            .into());
        }
    }
    let exe = std::env::current_exe()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = child_args(&args);
    let port = free_port()?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut printers = Vec::new();
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        if rank > 0 {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop(&mut children);
                return Err(anyhow::anyhow!("starting rank {rank} ({}): {e}", exe.display()));
            }
        };
        if let Some(err) = child.stderr.take() {
            printers.push(std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {line}");
                }
            }));
        }
        children.push((rank, child));
    }
    // Ctrl-C reaches every rank (one process group): they checkpoint and exit 130; wait for that.
    let _ = signal_hook::flag::register(
        signal_hook::consts::SIGINT,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let mut first_failure: Option<(usize, ExitStatus)> = None;
    let mut interrupted = false;
    let mut running: Vec<(usize, Child)> = children;
    while !running.is_empty() {
        let mut i = 0;
        while i < running.len() {
            match running[i].1.try_wait()? {
                Some(status) => {
                    let (rank, _) = running.remove(i);
                    if !status.success() && first_failure.is_none() {
                        first_failure = Some((rank, status));
                    }
                    if status.code() == Some(130) {
                        // Interrupted: the others got the same Ctrl-C and are saving their
                        // checkpoint; let them finish instead of killing them.
                        interrupted = true;
                    }
                }
                None => i += 1,
            }
        }
        if interrupted && !running.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        if let Some((rank, status)) = first_failure {
            if !running.is_empty() {
                let others: Vec<String> = running.iter().map(|(r, _)| r.to_string()).collect();
                eprintln!("error: rank {rank} failed ({}); stopping ranks {}", describe(status), others.join(", "));
                stop(&mut running);
            }
            for p in printers {
                let _ = p.join();
            }
            if status.code() != Some(130) {
                eprintln!("error: rank {rank} of {nproc} failed ({})", describe(status));
            }
            let code = status.code().filter(|&c| c == 130 || c == 2).unwrap_or(1);
            return Err(Exit(code as u8).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in printers {
        let _ = p.join();
    }
    Ok(())
}

/// Kill the ranks this launcher started (by their child handles) and reap them.
fn stop(children: &mut Vec<(usize, Child)>) {
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
    }
    for (_, c) in children.iter_mut() {
        let _ = c.wait();
    }
    children.clear();
}

#[cfg(test)]
mod tests {
    use super::child_args;

    #[test]
    fn the_ranks_get_the_command_line_without_the_launcher_flag() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            child_args(&a(&["run", "--nproc-per-node", "2", "r.toml", "-j", "2"])),
            a(&["run", "r.toml", "-j", "2"])
        );
        assert_eq!(child_args(&a(&["run", "r.toml", "--nproc-per-node=4"])), a(&["run", "r.toml"]));
    }
}
