//! A kind the planner accepts but this build cannot run yet: running it fails with a clear error
//! (never a fake output). Each kind moves to its own module as it is implemented.

use pipeline_engine::{Declared, PlanCtx, RunCtx, Stage, StageError};

pub(crate) struct Pending(pub &'static str);

impl Stage for Pending {
    fn kind(&self) -> &'static str {
        self.0
    }
    fn version(&self) -> u32 {
        0
    }
    fn summary(&self) -> &'static str {
        "(not implemented in this build)"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        let _ = ctx;
        Ok(Declared { outputs: vec!["data".into(), "model".into(), "report".into()], files: vec![] })
    }
    fn run(&self, _ctx: &RunCtx) -> Result<(), StageError> {
        Err(StageError::failed(format!("stage kind `{}` is not implemented in this build of pipeline", self.0)))
    }
}
