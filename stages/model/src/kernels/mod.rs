//! Kernels the architecture calls but does not define: products through frozen weights without a
//! weight gradient, the fused LM-head cross-entropy, and the CPU's batch-1 row dot products.
//!
//! Each kernel has a plain dfdx reference path it is tested against on the same inputs (candle's
//! `CustomOp` / Liger Kernel's convention). The custom backward passes are recorded with dfdx's
//! public tape API (`Tape::add_backward_op`, `Gradients::get_or_alloc_mut`); writing into a
//! gradient buffer needs the device's buffer type, which is public for the CPU
//! ([`cpu_buffer`]). On other devices (CUDA until its kernels land) the callers take the
//! reference path, so behaviour is identical everywhere and only the cost differs.

#[cfg(feature = "cuda")]
pub(crate) mod attention;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub(crate) mod frozen;
#[cfg(feature = "cuda")]
pub(crate) mod fused;
pub(crate) mod fused_ce;
pub(crate) mod host_attention;
pub(crate) mod host_matmul;
#[cfg(feature = "cuda")]
pub(crate) mod mlp;
pub mod profile;
pub(crate) mod qblocks;
pub(crate) mod quant;

use std::any::{Any, TypeId};

use dfdx::prelude::*;

/// `PIPELINE_REFERENCE_KERNELS=1` makes every caller take the reference path (read once): for the
/// benchmarks that compare the two in one build (`benches/throughput.rs`).
pub(crate) fn reference_only() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("PIPELINE_REFERENCE_KERNELS").is_ok_and(|v| v == "1"))
}

/// Whether `D` is dfdx's CPU device (the kernels here run on host memory).
pub(crate) fn is_cpu<D: 'static>() -> bool {
    TypeId::of::<D>() == TypeId::of::<Cpu>()
}

/// A gradient buffer of device `D` as the CPU's `Vec<f32>`, when `D` is the CPU (`None` otherwise).
pub(crate) fn cpu_buffer<D: Storage<f32>>(buf: &mut D::Vec) -> Option<&mut Vec<f32>> {
    let any: &mut dyn Any = buf;
    any.downcast_mut::<<Cpu as Storage<f32>>::Vec>().map(|v| &mut **v)
}

/// Whether `D` is dfdx's CUDA device.
#[cfg(feature = "cuda")]
pub(crate) fn is_cuda<D: 'static>() -> bool {
    TypeId::of::<D>() == TypeId::of::<Cuda>()
}
/// Whether `D` is dfdx's CUDA device (never, in a build without the `cuda` feature).
#[cfg(not(feature = "cuda"))]
#[allow(clippy::extra_unused_type_parameters)]
pub(crate) fn is_cuda<D: 'static>() -> bool {
    false
}

/// A gradient buffer of device `D` as a CUDA slice, when `D` is the CUDA device.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_buffer<D: Storage<f32>>(buf: &mut D::Vec) -> Option<&mut cudarc::driver::CudaSlice<f32>> {
    let any: &mut dyn Any = buf;
    any.downcast_mut::<<Cuda as Storage<f32>>::Vec>().map(|v| &mut **v)
}

/// The CUDA buffer of a tensor of device `D`, when `D` is the CUDA device.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_data<S: Shape, D: Storage<f32>, T>(
    t: &Tensor<S, f32, D, T>,
) -> Option<&cudarc::driver::CudaSlice<f32>> {
    let any: &dyn Any = dfdx::tensor::Tensorlike::data(t)?;
    any.downcast_ref::<<Cuda as Storage<f32>>::Vec>().map(|v| &**v)
}

/// `value` as type `B` when it is one (device-generic code handing a concrete device's tensor or
/// error back as its generic type).
#[cfg(feature = "cuda")]
pub(crate) fn cast<A: 'static, B: 'static>(value: A) -> Option<B> {
    let boxed: Box<dyn Any> = Box::new(value);
    boxed.downcast::<B>().ok().map(|b| *b)
}

/// `dst += src` for two gradient buffers of device `D` of one length (the CPU's or CUDA's).
pub(crate) fn add_assign_buf<D: Storage<f32>>(dst: &mut D::Vec, src: &D::Vec) -> Result<(), D::Err> {
    let s: &dyn Any = src;
    #[cfg(feature = "cuda")]
    if let Some(s) = s.downcast_ref::<<Cuda as Storage<f32>>::Vec>() {
        let d = cuda_buffer::<D>(dst).expect("both buffers are on the CUDA device");
        return cuda::add_into(d, s).map_err(|e| cast::<CudaError, D::Err>(e).expect("CUDA error type"));
    }
    let s = s.downcast_ref::<<Cpu as Storage<f32>>::Vec>().expect("a CPU or CUDA gradient buffer");
    let d = cpu_buffer::<D>(dst).expect("both buffers are on the CPU");
    for (a, b) in d.iter_mut().zip(s.iter()) {
        *a += b;
    }
    Ok(())
}

/// Threads the host kernels split rows over (the machine's cores, at most 8).
/// Read once: `available_parallelism` reads the cgroup files at every call (~15 µs), which a
/// decoding step's many small products would pay each time.
pub(crate) fn host_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |t| t.get()).min(8))
}
