//! The batching measurement's function, bound twice by the bench server: as
//! `model` (`Function::blocking`) and as `model_batched` (the same with
//! `.batch(BATCH_POLICY)`).

use std::time::{Duration, Instant};

use teleport::{Array, BatchPolicy, HandlerError, Tree};

/// `y = W x` with `W` of shape `[MODEL_OUT, MODEL_IN]` and `x` a float32
/// vector of `MODEL_IN` values...
pub(crate) const MODEL_IN: usize = 256;
pub(crate) const MODEL_OUT: usize = 64;
/// ...plus this much fixed CPU work per invocation of the function, standing
/// for what a batch shares (loading weights, launching a GPU kernel): the
/// unbatched function pays it per call, the batched one per batch.
pub(crate) const INVOCATION_COST: Duration = Duration::from_micros(50);
/// Calls in flight for the batching measurement.
pub(crate) const BATCH_IN_FLIGHT: usize = 64;
pub(crate) const BATCH_POLICY: BatchPolicy = BatchPolicy {
    max_batch: BATCH_IN_FLIGHT,
    max_wait: Duration::from_millis(1),
};

/// One input vector.
pub(crate) fn input() -> Tree {
    Tree::Array(Array::from_vec1(
        (0..MODEL_IN)
            .map(|i| (i % 7) as f32 - 3.0)
            .collect::<Vec<_>>(),
    ))
}

/// For one call (`x` of shape `[MODEL_IN]`) or a batch (`[N, MODEL_IN]`):
/// `W x` per row, with `W[o][i] = ((o + i) % 5 - 2) / 4`, after
/// [`INVOCATION_COST`] of fixed work.
pub(crate) fn model(x: &Tree) -> Result<Tree, HandlerError> {
    let x = x.as_array()?;
    let rows = match x.shape() {
        [n] if *n == MODEL_IN => None,
        [rows, n] if *n == MODEL_IN => Some(*rows),
        shape => {
            return Err(HandlerError::new(format!(
                "expected a float32 array of shape [{MODEL_IN}] (or [N, {MODEL_IN}] batched), \
                 got {shape:?}"
            )))
        }
    };
    let started = Instant::now();
    while started.elapsed() < INVOCATION_COST {
        std::hint::spin_loop();
    }
    let input = x.as_slice::<f32>()?;
    let mut out = Vec::with_capacity(rows.unwrap_or(1) * MODEL_OUT);
    for row in input.chunks_exact(MODEL_IN) {
        for o in 0..MODEL_OUT {
            let sum: f32 = row
                .iter()
                .enumerate()
                .map(|(i, v)| v * (((o + i) % 5) as f32 - 2.0) / 4.0)
                .sum();
            out.push(sum);
        }
    }
    let shape = match rows {
        None => vec![MODEL_OUT],
        Some(rows) => vec![rows, MODEL_OUT],
    };
    Ok(Tree::Array(Array::from_vec(shape, out)?))
}
