//! Functions of serde types: [`typed`] and [`typed_blocking`] turn a function
//! of any `Deserialize` argument and `Serialize` result into a function of
//! trees, converting with [`teleport_protocol::from_tree`] and
//! [`to_tree`](teleport_protocol::to_tree) (arrays pass through without a
//! copy).

use std::future::Future;
use std::pin::Pin;

use serde::de::DeserializeOwned;
use serde::Serialize;
use teleport_protocol::{from_tree, to_tree, SerdeError, Tree};

use crate::HandlerError;

/// The future of a [`typed`] function.
pub type TypedFuture = Pin<Box<dyn Future<Output = Result<Tree, HandlerError>> + Send>>;

/// An async function of serde types, as a function of trees to
/// [`bind`](crate::ServerBuilder::bind) (or give to [`Function::new`](crate::Function::new)).
/// Arguments that do not convert fail the call with a `TypeError` naming the
/// place; the function does not run.
///
/// ```no_run
/// use serde::{Deserialize, Serialize};
/// use teleport_protocol::Array;
/// use teleport_server::{typed, Server};
///
/// #[derive(Deserialize)]
/// struct Scale { images: Array, factor: f32 }
/// #[derive(Serialize)]
/// struct Scaled { images: Array, count: usize }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let server = Server::builder()
///     .bind("scale", typed(|req: Scale| async move {
///         let out: Vec<f32> = req.images.as_slice::<f32>()?.iter().map(|x| x * req.factor).collect();
///         let count = out.len();
///         Ok(Scaled { images: teleport_protocol::Array::from_vec(req.images.shape(), out)?, count })
///     }))
///     .listen("127.0.0.1:4433")
///     .await?;
/// # Ok(()) }
/// ```
pub fn typed<Req, Resp, F, Fut>(function: F) -> impl Fn(Tree) -> TypedFuture + Send + Sync + 'static
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + 'static,
    F: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, HandlerError>> + Send + 'static,
{
    move |args: Tree| -> TypedFuture {
        match from_tree::<Req>(args) {
            Ok(request) => {
                let running = function(request);
                Box::pin(async move { to_result(&running.await?) })
            }
            Err(e) => Box::pin(std::future::ready(Err(arguments_error(&e)))),
        }
    }
}

/// A blocking function of serde types, as a blocking function of trees for
/// [`Function::blocking`](crate::Function::blocking). See [`typed`].
pub fn typed_blocking<Req, Resp, F>(
    function: F,
) -> impl Fn(Tree) -> Result<Tree, HandlerError> + Send + Sync + 'static
where
    Req: DeserializeOwned,
    Resp: Serialize,
    F: Fn(Req) -> Result<Resp, HandlerError> + Send + Sync + 'static,
{
    move |args: Tree| {
        let request = from_tree::<Req>(args).map_err(|e| arguments_error(&e))?;
        to_result(&function(request)?)
    }
}

fn arguments_error(e: &SerdeError) -> HandlerError {
    HandlerError::with_type("TypeError", format!("the arguments do not fit: {e}"))
}

fn to_result<Resp: Serialize>(response: &Resp) -> Result<Tree, HandlerError> {
    to_tree(response).map_err(|e| {
        HandlerError::with_type("TypeError", format!("the result does not convert: {e}"))
    })
}
