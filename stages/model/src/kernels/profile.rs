//! Where a training step's time goes, section by section, forward and backward
//! (`PIPELINE_PROFILE=1`; off by default and free when off).
//!
//! A marker ([`mark`]) placed after a section of the forward synchronises the device and adds the
//! time since the previous event to that section's forward total; it also records a backward op
//! on the tape, so when the backward reaches the same point the device is synchronised again and
//! the time since the previous backward marker is added to the backward total of the section that
//! followed it (backward ops run in reverse creation order). Synchronising costs a few
//! microseconds per marker and serialises the host with the device, so profiled steps are a
//! little slower than unprofiled ones; the shares are what matter. The benches print
//! [`report`]; code outside the model marks its own phases with [`record`].

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use dfdx::prelude::*;

/// Whether `PIPELINE_PROFILE=1` (read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("PIPELINE_PROFILE").is_ok_and(|v| v == "1"))
}

#[derive(Default)]
struct State {
    last: Option<Instant>,
    /// label → (forward seconds, backward seconds, forward calls)
    totals: BTreeMap<&'static str, (f64, f64, u64)>,
    /// The section whose backward the next backward marker closes.
    bwd_prev: &'static str,
}

fn state() -> &'static Mutex<State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(State { bwd_prev: "loss", ..State::default() }))
}

fn sync<D: 'static + Clone>(dev: &D) {
    #[cfg(feature = "cuda")]
    if let Some(cuda) = super::cast::<D, Cuda>(dev.clone()) {
        // a failed synchronise surfaces at the next real op; the profile only loses accuracy
        let _ = cuda.cuda_device().synchronize();
    }
    let _ = dev;
}

fn elapsed(st: &mut State) -> f64 {
    let now = Instant::now();
    let dt = st.last.map_or(0.0, |t| (now - t).as_secs_f64());
    st.last = Some(now);
    dt
}

/// Adds the time since the previous event (device synchronised first) to `label`'s forward
/// column: for phases outside the model (the optimizer step, the loss).
pub fn record<D: Device<f32>>(dev: &D, label: &'static str) {
    if !enabled() {
        return;
    }
    sync(dev);
    let mut st = state().lock().unwrap_or_else(|e| e.into_inner());
    let dt = elapsed(&mut st);
    let e = st.totals.entry(label).or_default();
    e.0 += dt;
    e.2 += 1;
    st.bwd_prev = "loss";
}

/// `x` unchanged; with profiling on, the end of section `label` in the forward and (on a tape)
/// in the backward.
pub(crate) fn mark<S: Shape, D: Device<f32>, T: Tape<f32, D>>(
    x: Tensor<S, f32, D, T>,
    label: &'static str,
) -> Tensor<S, f32, D, T> {
    if !enabled() {
        return x;
    }
    let dev = x.device().clone();
    record(&dev, label);
    if !T::OWNS_TAPE {
        return x;
    }
    let (x, mut tape) = x.split_tape();
    tape.add_backward_op(move |_grads| {
        sync(&dev);
        let mut st = state().lock().unwrap_or_else(|e| e.into_inner());
        let dt = elapsed(&mut st);
        let prev = st.bwd_prev;
        st.totals.entry(prev).or_default().1 += dt;
        st.bwd_prev = label;
        Ok(())
    });
    x.put_tape(tape)
}

/// Forgets everything recorded so far (after a warm-up step).
pub fn reset() {
    let mut st = state().lock().unwrap_or_else(|e| e.into_inner());
    *st = State { bwd_prev: "loss", ..State::default() };
}

/// The table of sections: forward and backward milliseconds per `steps` and their shares.
pub fn report(steps: usize) -> String {
    let st = state().lock().unwrap_or_else(|e| e.into_inner());
    let total: f64 = st.totals.values().map(|(f, b, _)| f + b).sum();
    let mut rows: Vec<_> = st.totals.iter().collect();
    rows.sort_by(|a, b| (b.1 .0 + b.1 .1).total_cmp(&(a.1 .0 + a.1 .1)));
    let per = |x: f64| 1e3 * x / steps.max(1) as f64;
    let mut out = format!("{:<28} {:>10} {:>10} {:>7}\n", "section (per step)", "fwd ms", "bwd ms", "share");
    for (label, (f, b, _)) in rows {
        out +=
            &format!("{label:<28} {:>10.2} {:>10.2} {:>6.1}%\n", per(*f), per(*b), 100.0 * (f + b) / total.max(1e-12));
    }
    out += &format!("{:<28} {:>21.2}\n", "total", per(total));
    out
}
