//! Named access to the trainable tensors of any dfdx [`TensorCollection`]: read them to the host,
//! write them back in place (tensor ids, hence gradient bookkeeping, are unchanged), and read their
//! gradients. Names are dfdx's dotted field paths (`0.weight`, `layers.3.lora_a`...).
//!
//! Only tensors whose [`TensorOptions::do_gradient_update`] is set are visited: they are what the
//! optimizer updates and what a checkpoint stores.

use std::collections::BTreeMap;

use dfdx::nn::tensor_collection::{
    RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorMut, ViewTensorName, ViewTensorRef,
};
use dfdx::prelude::*;

use crate::TrainError;

/// One tensor on the host, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

struct ParamReader<'a> {
    out: &'a mut Vec<NamedTensor>,
}

impl<D: Device<f32>> TensorVisitor<f32, D> for ParamReader<'_> {
    type Viewer = (ViewTensorRef, ViewTensorName);
    type Err = D::Err;
    type E2 = f32;
    type D2 = D;

    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, f32, D>,
        (t, name): (&Tensor<S, f32, D>, String),
    ) -> Result<Option<Tensor<S, f32, D>>, Self::Err> {
        if opts.do_gradient_update {
            self.out.push(NamedTensor { name, shape: t.shape().concrete().into_iter().collect(), data: t.as_vec() });
        }
        Ok(None)
    }
}

/// Every trainable tensor of `model`, in visiting order.
pub fn read_params<M: TensorCollection<f32, D>, D: Device<f32>>(model: &M) -> Result<Vec<NamedTensor>, TrainError> {
    let mut out = Vec::new();
    M::iter_tensors(&mut RecursiveWalker { m: (model, String::new()), f: &mut ParamReader { out: &mut out } })
        .map_err(|e| TrainError::Device(format!("{e:?}")))?;
    Ok(out)
}

struct GradReader<'a, D: Device<f32>> {
    out: &'a mut Vec<NamedTensor>,
    grads: &'a mut Gradients<f32, D>,
}

impl<D: Device<f32>> TensorVisitor<f32, D> for GradReader<'_, D> {
    type Viewer = (ViewTensorRef, ViewTensorName);
    type Err = D::Err;
    type E2 = f32;
    type D2 = D;

    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, f32, D>,
        (t, name): (&Tensor<S, f32, D>, String),
    ) -> Result<Option<Tensor<S, f32, D>>, Self::Err> {
        if opts.do_gradient_update {
            // A parameter the loss did not touch has a zero gradient.
            self.grads.try_alloc_for(t)?;
            let g = self.grads.get(t);
            self.out.push(NamedTensor { name, shape: t.shape().concrete().into_iter().collect(), data: g.as_vec() });
        }
        Ok(None)
    }
}

/// The gradient of every trainable tensor of `model` (zeros for tensors the loss did not reach).
pub fn read_grads<M: TensorCollection<f32, D>, D: Device<f32>>(
    model: &M,
    grads: &mut Gradients<f32, D>,
) -> Result<Vec<NamedTensor>, TrainError> {
    let mut out = Vec::new();
    M::iter_tensors(&mut RecursiveWalker { m: (model, String::new()), f: &mut GradReader { out: &mut out, grads } })
        .map_err(|e| TrainError::Device(format!("{e:?}")))?;
    Ok(out)
}

struct ParamWriter<'a> {
    values: &'a BTreeMap<String, NamedTensor>,
    seen: usize,
    error: Option<TrainError>,
}

impl<D: Device<f32>> TensorVisitor<f32, D> for ParamWriter<'_> {
    type Viewer = (ViewTensorMut, ViewTensorName);
    type Err = D::Err;
    type E2 = f32;
    type D2 = D;

    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, f32, D>,
        (t, name): (&mut Tensor<S, f32, D>, String),
    ) -> Result<Option<Tensor<S, f32, D>>, Self::Err> {
        if !opts.do_gradient_update || self.error.is_some() {
            return Ok(None);
        }
        let shape: Vec<usize> = t.shape().concrete().into_iter().collect();
        match self.values.get(&name) {
            None => self.error = Some(TrainError::Checkpoint(format!("tensor `{name}` is missing"))),
            Some(v) if v.shape != shape => {
                self.error = Some(TrainError::Checkpoint(format!(
                    "tensor `{name}` has shape {:?}, the model expects {shape:?}",
                    v.shape
                )))
            }
            Some(v) => {
                t.copy_from(&v.data);
                self.seen += 1;
            }
        }
        Ok(None)
    }
}

/// Overwrite the trainable tensors of `model` in place from `values` (by name). Every trainable
/// tensor must be present with the same shape; extra entries are an error too.
pub fn write_params<M: TensorCollection<f32, D>, D: Device<f32>>(
    model: &mut M,
    values: &[NamedTensor],
) -> Result<(), TrainError> {
    let map: BTreeMap<String, NamedTensor> = values.iter().map(|t| (t.name.clone(), t.clone())).collect();
    let mut w = ParamWriter { values: &map, seen: 0, error: None };
    M::iter_tensors(&mut RecursiveWalker { m: (model, String::new()), f: &mut w })
        .map_err(|e| TrainError::Device(format!("{e:?}")))?;
    if let Some(e) = w.error {
        return Err(e);
    }
    if w.seen != map.len() {
        return Err(TrainError::Checkpoint(format!(
            "{} stored tensors but the model has {} trainable tensors",
            map.len(),
            w.seen
        )));
    }
    Ok(())
}

/// Total number of trainable scalars.
pub fn num_trainable<M: TensorCollection<f32, D>, D: Device<f32>>(model: &M) -> Result<usize, TrainError> {
    Ok(read_params(model)?.iter().map(|t| t.data.len()).sum())
}
