//! The API's request routing (method, URL, body to an [`Action`] or an error
//! reply), for the fuzz targets in `fuzz/` (see docs/fuzzing.md). Not part of
//! the VMM's interface.

use super::Action;

/// Routes a request as the API listener (`metrics_only`: the metrics
/// listener) does after tiny_http parsed it. `Err` is the reply's status and
/// JSON body.
pub fn route(
    method: &str,
    url: &str,
    body: &[u8],
    metrics_only: bool,
) -> Result<Action, (u16, serde_json::Value)> {
    let Ok(method) = method.parse::<tiny_http::Method>() else {
        return Err(super::error(400, "unparseable method"));
    };
    if metrics_only {
        super::route_metrics_only(&method, url, body)
    } else {
        super::route(&method, url, body)
    }
}
