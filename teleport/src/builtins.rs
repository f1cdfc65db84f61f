//! The functions `teleport serve` and `teleport demo` bind.

use std::sync::Arc;
use std::time::{Duration, Instant};

use teleport::quic::reference::KeptPayload;
use teleport::{tree, Array, DType, Function, HandlerError, Map, ServerBuilder, Tree};

/// The names bound by [`bind_builtins`], for `info` and the help text.
pub(crate) const METHODS: [&str; 7] = ["echo", "info", "sink", "sleep", "source", "sum", "zeros"];

/// `zeros` refuses to allocate more than this for one caller.
const MAX_ZEROS_BYTES: usize = 1 << 30;

/// `sleep` refuses longer naps, so a typo cannot park a call for days.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// Binds the built-in functions on `builder`.
pub(crate) fn bind_builtins(builder: ServerBuilder) -> ServerBuilder {
    let started = Instant::now();
    let kept_source = Arc::new(KeptPayload::default());
    builder
        // Moves the tree back: the array buffers are not copied again.
        .bind("echo", |args: Tree| async move { Ok(args) })
        .bind("info", move |_args: Tree| async move {
            let methods: Vec<Tree> = METHODS.iter().map(|&m| Tree::from(m)).collect();
            Ok(tree!({
                "server": (concat!("teleport ", env!("CARGO_PKG_VERSION"))),
                "methods": (methods),
                "uptime_seconds": (started.elapsed().as_secs_f64()),
                "pid": (std::process::id()),
            }))
        })
        .bind("zeros", |args: Tree| async move { zeros(&args) })
        // `teleport bench` measures downloads with it: `source({"bytes": n})`
        // answers with n bytes from a kept payload, as the bare-quinn and TCP
        // references do, so a download measures sending what the server has.
        // A call of another size replaces it; `{"bytes": 0}` lets it go.
        .bind("source", move |args: Tree| {
            let kept = kept_source.clone();
            async move { source(&kept, &args) }
        })
        // Takes anything and answers with the bytes of array data it got:
        // `teleport bench --connect` measures uploads with it.
        .bind("sink", |args: Tree| async move {
            Ok(tree!({"bytes": (args.data_len() as i64)}))
        })
        // Async, so a cancelled or expired call drops the timer at once: the
        // server aborts the function's task.
        .bind("sleep", |args: Tree| async move {
            let seconds = sleep_seconds(&args)?;
            tokio::time::sleep(seconds).await;
            Ok(tree!({"slept_seconds": (seconds.as_secs_f64())}))
        })
        // Blocking: summing hundreds of MiB is CPU work that must not stall
        // the connections' tasks.
        .bind("sum", Function::blocking(|args: Tree| sum(&args)))
}

/// `zeros({"dtype": "float32", "shape": [2, 3]})`: an array of zeros.
fn zeros(args: &Tree) -> Result<Tree, HandlerError> {
    let dtype = parse_dtype(args.get("dtype")?.as_str()?)?;
    let shape = parse_shape(args.get("shape")?)?;
    let fits = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.size()))
        .is_some_and(|bytes| bytes <= MAX_ZEROS_BYTES);
    if !fits {
        return Err(HandlerError::with_type(
            "ValueError",
            format!(
                "zeros makes at most {MAX_ZEROS_BYTES} bytes; shape {shape:?} of {dtype} is larger"
            ),
        ));
    }
    Ok(Tree::Array(Array::zeros(dtype, shape)?))
}

/// `source({"bytes": n})`: a `uint8` array of `n` bytes from `kept`.
fn source(kept: &KeptPayload, args: &Tree) -> Result<Tree, HandlerError> {
    let bytes = usize::try_from(args.get("bytes")?.as_int()?)
        .ok()
        .filter(|&n| n <= MAX_ZEROS_BYTES)
        .ok_or_else(|| {
            HandlerError::with_type(
                "ValueError",
                format!("source sends from 0 to {MAX_ZEROS_BYTES} bytes"),
            )
        })?;
    Ok(Tree::Array(Array::new(
        DType::U8,
        [bytes],
        kept.get(bytes),
    )?))
}

/// `sleep(2.5)` or `sleep({"seconds": 2.5})`.
fn sleep_seconds(args: &Tree) -> Result<Duration, HandlerError> {
    let value = match args {
        Tree::Map(_) => args.get("seconds")?,
        other => other,
    };
    let seconds = match value {
        Tree::Int(i) => *i as f64,
        Tree::Float(f) => *f,
        other => {
            return Err(HandlerError::with_type(
                "TypeError",
                format!("sleep takes a number of seconds, got {}", other.kind_name()),
            ))
        }
    };
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| *d <= MAX_SLEEP)
        .ok_or_else(|| {
            HandlerError::with_type(
                "ValueError",
                format!(
                    "sleep takes 0 to {} seconds, got {seconds}",
                    MAX_SLEEP.as_secs()
                ),
            )
        })
}

/// `sum(x)` or `sum({"x": x})` for a float32 array `x`: the sum as a float
/// and the element count.
fn sum(args: &Tree) -> Result<Tree, HandlerError> {
    let array = match args {
        Tree::Map(_) => args.get("x")?.as_array()?,
        other => other.as_array()?,
    };
    if array.dtype() != DType::F32 {
        return Err(HandlerError::with_type(
            "TypeError",
            format!(
                "sum takes a float32 array, got {} of shape {:?}",
                array.dtype(),
                array.shape()
            ),
        ));
    }
    // Sums in f64 so that a large array's total does not drift.
    let total: f64 = array.as_slice::<f32>()?.iter().map(|&v| f64::from(v)).sum();
    let mut reply = Map::new();
    reply.insert("sum", total);
    reply.insert("count", array.len() as i64);
    Ok(Tree::Map(reply))
}

/// Reads a dtype by NumPy name (`"float32"`) or short name (`"f32"`).
pub(crate) fn parse_dtype(name: &str) -> Result<DType, HandlerError> {
    let short = |d: DType| match d {
        DType::Bool => "bool",
        DType::I8 => "i8",
        DType::I16 => "i16",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::U8 => "u8",
        DType::U16 => "u16",
        DType::U32 => "u32",
        DType::U64 => "u64",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::Complex64 => "c64",
        DType::Complex128 => "c128",
        _ => "",
    };
    DType::ALL
        .into_iter()
        .find(|&d| d.name() == name || short(d) == name)
        .ok_or_else(|| {
            let known: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
            HandlerError::with_type(
                "ValueError",
                format!("unknown dtype {name:?}; use one of {}", known.join(", ")),
            )
        })
}

/// Reads a shape: a list of non-negative integers.
pub(crate) fn parse_shape(tree: &Tree) -> Result<Vec<usize>, HandlerError> {
    tree.as_list()?
        .iter()
        .map(|d| {
            let d = d.as_int()?;
            usize::try_from(d).map_err(|_| {
                HandlerError::with_type("ValueError", format!("a shape holds sizes >= 0, got {d}"))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_parse_both_ways() {
        assert_eq!(parse_dtype("float32").unwrap(), DType::F32);
        assert_eq!(parse_dtype("f32").unwrap(), DType::F32);
        assert_eq!(parse_dtype("c128").unwrap(), DType::Complex128);
        let err = parse_dtype("float31").unwrap_err();
        assert!(err.message().contains("float32"), "{err}");
    }

    #[test]
    fn zeros_refuses_huge_shapes_without_allocating() {
        let err = zeros(&tree!({"dtype": "f64", "shape": [65536, 65536, 65536]})).unwrap_err();
        assert_eq!(err.type_name(), "ValueError");
        let ok = zeros(&tree!({"dtype": "u8", "shape": [2, 3]})).unwrap();
        assert_eq!(ok.as_array().unwrap().shape(), &[2, 3]);
    }

    #[test]
    fn source_keeps_one_payload_per_size_and_lets_it_go_at_zero() {
        let kept = KeptPayload::default();
        let first = source(&kept, &tree!({"bytes": 4096})).unwrap();
        let again = source(&kept, &tree!({"bytes": 4096})).unwrap();
        let (first, again) = (first.as_array().unwrap(), again.as_array().unwrap());
        assert_eq!(first.nbytes(), 4096);
        assert!(first.data().iter().all(|&b| b == KeptPayload::BYTE));
        assert_eq!(
            first.data().as_ptr(),
            again.data().as_ptr(),
            "the same bytes"
        );
        let gone = source(&kept, &tree!({"bytes": 0})).unwrap();
        assert_eq!(gone.as_array().unwrap().nbytes(), 0);
        let made_again = source(&kept, &tree!({"bytes": 4096})).unwrap();
        assert_ne!(
            made_again.as_array().unwrap().data().as_ptr(),
            first.data().as_ptr(),
            "made again after a call of 0 bytes"
        );
        let err = source(&kept, &tree!({"bytes": -1})).unwrap_err();
        assert_eq!(err.type_name(), "ValueError");
        assert!(source(&kept, &tree!({"bytes": ((MAX_ZEROS_BYTES + 1) as i64)})).is_err());
    }

    #[test]
    fn sum_checks_the_dtype() {
        let x = Array::from_vec1(vec![1.0f32, 2.0, 3.5]);
        let reply = sum(&tree!({"x": (x)})).unwrap();
        assert_eq!(reply.get("sum").unwrap().as_float().unwrap(), 6.5);
        let err = sum(&Tree::Array(Array::from_vec1(vec![1i32]))).unwrap_err();
        assert!(err.message().contains("int32"), "{err}");
    }

    #[test]
    fn sleep_takes_a_number_or_a_map() {
        assert_eq!(
            sleep_seconds(&tree!(0.5)).unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            sleep_seconds(&tree!({"seconds": 2})).unwrap(),
            Duration::from_secs(2)
        );
        assert!(sleep_seconds(&tree!(-1.0)).is_err());
        assert!(sleep_seconds(&tree!("x")).is_err());
    }
}
