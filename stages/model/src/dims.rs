//! Dimension types of the decoder: compile-time for the built-in preset, runtime for checkpoints.
//!
//! [`Qwen2<D, S>`](crate::Qwen2) is generic over `S: Dims`, which names the dfdx [`Dim`] type of
//! every model dimension the maths uses (hidden size, SwiGLU width, query / KV heads, head size and
//! the two products `heads × head_dim`, `kv_heads × head_dim`: stable Rust cannot compute a `Const`
//! product from two `Const`s, so the products are named too). The activations of the forward pass
//! are typed with them (`[tokens, S::Hidden]`, `[batch, S::KvHeads, len, S::HeadDim]`, ...), so
//! with [`TinyDims`] the compiler checks every matmul, reshape and broadcast of the ONE architecture
//! implementation against the preset's shapes, and with [`RuntimeDims`] (all `usize`, the default
//! type parameter) the same code runs any checkpoint from disk.
//!
//! What stays `usize` in both: the vocabulary (the tiny preset's vocabulary is chosen from the
//! training corpus at run time, see [`crate::vocab`]), batch, sequence and cache lengths, the LoRA
//! rank and the number of layers (a `Vec` of layers).
//!
//! Building a model checks the config against the dimension types ([`DimValues::from_config`]):
//! a mismatch is a [`ModelError::Config`] naming the config field. Weights are stored the same
//! way for every `S` (flat device vectors, see [`crate::params`]), so
//! [`Qwen2::into_runtime`](crate::Qwen2::into_runtime) /
//! [`Qwen2::into_dims`](crate::Qwen2::into_dims) convert between the two without copying a weight.

use dfdx::shapes::{Const, Dim};

use crate::config::{tiny, ModelConfig};
use crate::error::ModelError;

/// The dimension types of a decoder (see the module docs). Implementations are marker types.
pub trait Dims: 'static + std::fmt::Debug + Clone + Copy + Default + Send + Sync {
    /// `hidden_size`.
    type Hidden: FixedDim;
    /// `intermediate_size` (SwiGLU width).
    type Intermediate: FixedDim;
    /// `num_attention_heads`.
    type Heads: FixedDim;
    /// `num_key_value_heads`.
    type KvHeads: FixedDim;
    /// `head_dim`.
    type HeadDim: FixedDim;
    /// `num_attention_heads * head_dim` (rows of `q_proj`, columns of `o_proj`).
    type QDim: FixedDim;
    /// `num_key_value_heads * head_dim` (rows of `k_proj` / `v_proj`).
    type KvDim: FixedDim;
    /// Shown in errors (`"RuntimeDims"`, `"TinyDims"`).
    const NAME: &'static str;
}

/// Every dimension a runtime value (`usize`): checkpoints loaded from disk. The default `S` of
/// [`Qwen2`](crate::Qwen2), so `Qwen2<D>` is the runtime model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeDims;

impl Dims for RuntimeDims {
    type Hidden = usize;
    type Intermediate = usize;
    type Heads = usize;
    type KvHeads = usize;
    type HeadDim = usize;
    type QDim = usize;
    type KvDim = usize;
    const NAME: &'static str = "RuntimeDims";
}

/// The built-in tiny preset's dimensions ([`ModelConfig::tiny`]) fixed at compile time:
/// hidden 64, SwiGLU 176, 4 query heads / 2 KV heads of 16. The vocabulary stays runtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TinyDims;

impl Dims for TinyDims {
    type Hidden = Const<{ tiny::HIDDEN }>;
    type Intermediate = Const<{ tiny::INTERMEDIATE }>;
    type Heads = Const<{ tiny::HEADS }>;
    type KvHeads = Const<{ tiny::KV_HEADS }>;
    type HeadDim = Const<{ tiny::HEAD_DIM }>;
    type QDim = Const<{ tiny::Q_DIM }>;
    type KvDim = Const<{ tiny::KV_DIM }>;
    const NAME: &'static str = "TinyDims";
}

/// The values of a model's dimensions, typed by `S` (for a `Const` dimension the value carries no
/// data; for `usize` it is the config's number).
#[derive(Debug, Clone, Copy)]
pub struct DimValues<S: Dims> {
    pub hidden: S::Hidden,
    pub intermediate: S::Intermediate,
    pub heads: S::Heads,
    pub kv_heads: S::KvHeads,
    pub head_dim: S::HeadDim,
    pub q_dim: S::QDim,
    pub kv_dim: S::KvDim,
}

/// A [`Dim`] that says whether its size is fixed at compile time (`Const<N>` → `Some(N)`,
/// `usize` → `None`).
pub trait FixedDim: Dim {
    const FIXED: Option<usize>;
}
impl FixedDim for usize {
    const FIXED: Option<usize> = None;
}
impl<const N: usize> FixedDim for Const<N> {
    const FIXED: Option<usize> = Some(N);
}

fn dim<X: FixedDim>(value: usize, field: &str, name: &str) -> Result<X, ModelError> {
    X::from_size(value).ok_or_else(|| {
        let fixed = X::FIXED.map_or_else(|| "?".to_string(), |n| n.to_string());
        ModelError::config(field, format!("is {value}, but the compile-time dimensions {name} fix it at {fixed}"))
    })
}

impl<S: Dims> DimValues<S> {
    /// Checks `cfg` against `S`: each dimension must fit its type (any value for `usize`, exactly
    /// `N` for `Const<N>`). The error names the config field.
    pub fn from_config(cfg: &ModelConfig) -> Result<Self, ModelError> {
        let n = S::NAME;
        Ok(DimValues {
            hidden: dim(cfg.hidden_size, "hidden_size", n)?,
            intermediate: dim(cfg.intermediate_size, "intermediate_size", n)?,
            heads: dim(cfg.num_attention_heads, "num_attention_heads", n)?,
            kv_heads: dim(cfg.num_key_value_heads, "num_key_value_heads", n)?,
            head_dim: dim(cfg.head_dim, "head_dim", n)?,
            q_dim: dim(cfg.q_dim(), "num_attention_heads*head_dim", n)?,
            kv_dim: dim(cfg.kv_dim(), "num_key_value_heads*head_dim", n)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_dims_match_the_tiny_preset() {
        let v = DimValues::<TinyDims>::from_config(&ModelConfig::tiny(300)).unwrap();
        assert_eq!((v.hidden.size(), v.q_dim.size(), v.kv_dim.size()), (64, 64, 32));
        assert!(DimValues::<RuntimeDims>::from_config(&ModelConfig::tiny(300)).is_ok());
    }

    #[test]
    fn a_mismatch_names_the_field() {
        for (field, edit) in [
            ("hidden_size", (|c: &mut ModelConfig| c.hidden_size = 32) as fn(&mut ModelConfig)),
            ("intermediate_size", |c| c.intermediate_size = 128),
            ("num_attention_heads", |c| c.num_attention_heads = 8),
            ("num_key_value_heads", |c| c.num_key_value_heads = 4),
            ("head_dim", |c| c.head_dim = 8),
        ] {
            let mut c = ModelConfig::tiny(300);
            edit(&mut c);
            let e = DimValues::<TinyDims>::from_config(&c).unwrap_err().to_string();
            assert!(e.starts_with(&format!("config field `{field}`")), "{e}");
            assert!(e.contains("TinyDims fix it at"), "{e}");
            assert!(DimValues::<RuntimeDims>::from_config(&c).is_ok());
        }
    }
}
