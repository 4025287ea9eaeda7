//! Gradient hooks on the trained parameters, through the C++ shim
//! (`worker/csrc/script_module.cpp`): tch has no `register_hook`.
//!
//! A hook fires once per backward pass for each parameter that received a
//! gradient, in the order libtorch finishes them (roughly the reverse of
//! the forward), with that pass's whole gradient for the parameter. The
//! trainer uses them to start reducing a bucket of the gradient while the
//! backward pass goes on (see `crate::trainer::overlap`).
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

use super::script::{take_error, ScriptError};

type GradCallback = extern "C" fn(ctx: *mut c_void, index: usize, data: *const f32, numel: i64);

extern "C" {
    fn rt_register_grad_hook(
        t: *mut c_void,
        cb: GradCallback,
        ctx: *mut c_void,
        index: usize,
        err: *mut *mut c_char,
    ) -> i64;
    fn rt_remove_grad_hook(t: *mut c_void, handle: i64, err: *mut *mut c_char) -> c_int;
    fn rt_clear_grad(t: *mut c_void, err: *mut *mut c_char) -> c_int;
}

/// Receives each parameter's gradient as backward produces it.
pub trait GradSink {
    /// `index` is the parameter's place in the model's trained parameters;
    /// `grad` its gradient from this backward pass, flattened.
    fn gradient(&mut self, index: usize, grad: &[f32]);
}

/// The sink behind a thin pointer (the shim passes one `void *`), and
/// whether a callback panicked (a panic must not unwind into C++).
struct Context<'a> {
    sink: &'a mut dyn GradSink,
    panicked: Option<String>,
}

extern "C" fn on_gradient(ctx: *mut c_void, index: usize, data: *const f32, numel: i64) {
    // SAFETY: `ctx` is the `Context` that `with_hooks` keeps alive and does
    // not touch while backward runs (hooks fire on the thread that calls
    // backward, inside that call); `data` holds `numel` f32 that the shim
    // keeps alive for the call.
    let ctx = unsafe { &mut *ctx.cast::<Context>() };
    if ctx.panicked.is_some() {
        return;
    }
    let len = usize::try_from(numel).unwrap_or(0);
    let grad = if len == 0 || data.is_null() {
        &[][..]
    } else {
        unsafe { std::slice::from_raw_parts(data, len) }
    };
    let sink = &mut *ctx.sink;
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| sink.gradient(index, grad))) {
        ctx.panicked = Some(crate::panic_payload_message(payload.as_ref()));
    }
}

/// Runs `f` (which runs backward passes) with a hook on each of `params`
/// feeding `sink`; the hooks are gone when it returns.
pub fn with_hooks<R>(
    params: &[Tensor],
    sink: &mut dyn GradSink,
    f: impl FnOnce() -> R,
) -> Result<R, ScriptError> {
    let mut ctx = Context {
        sink,
        panicked: None,
    };
    let ctx_ptr: *mut c_void = (&mut ctx as *mut Context).cast();
    let mut handles = Vec::with_capacity(params.len());
    let mut failed = None;
    for (index, p) in params.iter().enumerate() {
        let mut err = std::ptr::null_mut();
        // SAFETY: `p` is a live tensor (tch's `at::Tensor *`); `ctx` outlives
        // the hook, which is removed below before `ctx` goes away.
        let handle = unsafe {
            rt_register_grad_hook(
                p.as_ptr() as *mut c_void,
                on_gradient,
                ctx_ptr,
                index,
                &mut err,
            )
        };
        if let Some(e) = take_error(err) {
            failed = Some(e);
            break;
        }
        handles.push((p, handle));
    }
    let result = failed.is_none().then(f);
    for (p, handle) in handles {
        let mut err = std::ptr::null_mut();
        // SAFETY: the handle came from registering on this same tensor.
        unsafe { rt_remove_grad_hook(p.as_ptr() as *mut c_void, handle, &mut err) };
        if let Some(e) = take_error(err) {
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if let Some(message) = ctx.panicked {
        return Err(ScriptError(format!("a gradient hook panicked: {message}")));
    }
    result.ok_or_else(|| ScriptError("gradient hooks were not installed".into()))
}

/// `.grad = None`: the next backward hands its gradient to the parameter
/// as is, instead of adding it to a zeroed buffer (one pass less over
/// every gradient).
pub fn clear_grad(t: &Tensor) -> Result<(), ScriptError> {
    let mut err = std::ptr::null_mut();
    // SAFETY: `t` is a live tensor.
    unsafe { rt_clear_grad(t.as_ptr() as *mut c_void, &mut err) };
    take_error(err).map_or(Ok(()), Err)
}
