//! Which rank of a data-parallel run this process is, read from the environment torchrun, Slurm's
//! `srun` (through a wrapper or `torchrun`) and Kubernetes jobs set: `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` (absent: one process). The engine only carries it:
//! with a world size above 1, rank 0 runs the pipeline as usual and is the only process that
//! writes the cache; every other rank ([`DistEnv::is_follower`]) reads the entries rank 0 commits,
//! waits for those not there yet, and joins the stages that train together
//! ([`crate::Stage::distributed_params`]) through the stage's own communication (the training
//! stages' TCP or NCCL communicator, which meets at `MASTER_ADDR:MASTER_PORT`).
//!
//! The world size enters no key by itself; a distributed stage says how its params read at a world
//! size (the training stages: `gradient_accumulation_steps × world size`, the global batch), so a
//! run at world size W is keyed, cached and resumed like one process with the same global batch.

use std::time::Duration;

/// `PIPELINE_DIST_TIMEOUT`'s default, seconds (NCCL's watchdog default in PyTorch).
pub const DEFAULT_DIST_TIMEOUT_SECS: u64 = 600;

/// This process's place in a data-parallel run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    /// The rank on this machine (picks the GPU: `cuda` means GPU `LOCAL_RANK`).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// `PIPELINE_DIST_TIMEOUT` (seconds): rendezvous deadline and timeout of every collective.
    pub timeout: Duration,
}

impl Default for DistEnv {
    fn default() -> Self {
        DistEnv::single()
    }
}

/// A malformed or inconsistent launcher variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DistEnvError {
    #[error("environment variable {name}={value:?} is not a {what}")]
    Malformed { name: &'static str, value: String, what: &'static str },
    #[error("RANK={rank} must be below WORLD_SIZE={world_size}")]
    RankOutOfRange { rank: usize, world_size: usize },
    #[error("WORLD_SIZE={world_size} but {name} is not set: a launcher (torchrun, srun, `pipeline run --nproc-per-node`) sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")]
    Missing { name: &'static str, world_size: usize },
}

impl DistEnv {
    /// One process: rank 0 of 1.
    pub fn single() -> DistEnv {
        DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            timeout: Duration::from_secs(DEFAULT_DIST_TIMEOUT_SECS),
        }
    }

    /// From the process environment.
    pub fn from_env() -> Result<DistEnv, DistEnvError> {
        DistEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// From `var` (the environment, or a map in tests). `WORLD_SIZE` absent or 1: one process.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<DistEnv, DistEnvError> {
        fn num<T: std::str::FromStr>(
            var: &impl Fn(&str) -> Option<String>,
            name: &'static str,
            what: &'static str,
        ) -> Result<Option<T>, DistEnvError> {
            match var(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => v.parse().map(Some).map_err(|_| DistEnvError::Malformed { name, value: v, what }),
            }
        }
        let mut env = DistEnv::single();
        if let Some(t) = num::<u64>(&var, "PIPELINE_DIST_TIMEOUT", "number of seconds")? {
            env.timeout = Duration::from_secs(t.max(1));
        }
        let world_size = num::<usize>(&var, "WORLD_SIZE", "positive integer")?.unwrap_or(1);
        if world_size == 0 {
            return Err(DistEnvError::Malformed { name: "WORLD_SIZE", value: "0".into(), what: "positive integer" });
        }
        if world_size == 1 {
            return Ok(env);
        }
        let missing = |name| DistEnvError::Missing { name, world_size };
        let rank = num::<usize>(&var, "RANK", "non-negative integer")?.ok_or_else(|| missing("RANK"))?;
        if rank >= world_size {
            return Err(DistEnvError::RankOutOfRange { rank, world_size });
        }
        env.rank = rank;
        env.world_size = world_size;
        env.local_rank = num::<usize>(&var, "LOCAL_RANK", "non-negative integer")?.unwrap_or(rank);
        env.master_addr = var("MASTER_ADDR").filter(|a| !a.trim().is_empty()).ok_or_else(|| missing("MASTER_ADDR"))?;
        env.master_port = num::<u16>(&var, "MASTER_PORT", "port number")?.ok_or_else(|| missing("MASTER_PORT"))?;
        Ok(env)
    }

    /// Rank 0: runs the pipeline and writes the cache.
    pub fn is_lead(&self) -> bool {
        self.rank == 0
    }

    /// A rank above 0 of a multi-process run: reads and waits for rank 0's entries, joins the
    /// distributed stages, writes nothing to the cache.
    pub fn is_follower(&self) -> bool {
        self.rank > 0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv, DistEnvError> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_variables_and_single_process_defaults() {
        assert_eq!(env(&[]).unwrap(), DistEnv::single());
        assert_eq!(env(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), DistEnv::single());
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
            ("PIPELINE_DIST_TIMEOUT", "30"),
        ])
        .unwrap();
        assert_eq!(
            (e.rank, e.world_size, e.local_rank, e.master_addr.as_str(), e.master_port),
            (3, 4, 1, "node0", 29400)
        );
        assert_eq!(e.timeout, Duration::from_secs(30));
        assert!(e.is_follower() && !e.is_lead());
    }

    #[test]
    fn bad_or_missing_variables_name_the_variable() {
        let e = env(&[("WORLD_SIZE", "two")]).unwrap_err().to_string();
        assert_eq!(e, r#"environment variable WORLD_SIZE="two" is not a positive integer"#);
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap_err();
        assert_eq!(e.to_string(), "RANK=2 must be below WORLD_SIZE=2");
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h")]).unwrap_err().to_string();
        assert!(e.starts_with("WORLD_SIZE=2 but MASTER_PORT is not set"), "{e}");
    }
}
