//! TorchScript modules a user brings (`model = "net.pt"`), loaded through
//! the small C++ shim in `worker/csrc/script_module.cpp`: tch's CModule
//! cannot list a module's buffers, which replicas must keep identical and
//! checkpoints must carry.
//!
//! Unsafe code here is FFI calls into the shim (as in `grad_hooks`). Every shim
//! entry point catches C++ exceptions and hands back a message.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr};

use tch::{Device, Tensor};

/// What went wrong inside libtorch, as it says it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScriptError(pub String);

type TensorCallback = extern "C" fn(*mut c_void, *const c_char, *mut c_void);

extern "C" {
    fn rt_free_string(s: *mut c_char);
    fn rt_module_load(
        data: *const c_char,
        len: usize,
        device: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn rt_module_free(m: *mut c_void);
    fn rt_module_named_parameters(
        m: *mut c_void,
        data: *mut c_void,
        f: TensorCallback,
        err: *mut *mut c_char,
    ) -> c_int;
    fn rt_module_named_buffers(
        m: *mut c_void,
        data: *mut c_void,
        f: TensorCallback,
        err: *mut *mut c_char,
    ) -> c_int;
    fn rt_module_train(m: *mut c_void, on: c_int, err: *mut *mut c_char) -> c_int;
    fn rt_module_forward(
        m: *mut c_void,
        inputs: *const *mut c_void,
        n: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
}

/// Takes the shim's error message, if it set one.
pub(super) fn take_error(err: *mut c_char) -> Option<ScriptError> {
    if err.is_null() {
        return None;
    }
    // SAFETY: the shim sets `err` only to a NUL-terminated string from
    // strdup, which we own and free here exactly once.
    let message = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { rt_free_string(err) };
    Some(ScriptError(message))
}

extern "C" fn push_named(data: *mut c_void, name: *const c_char, tensor: *mut c_void) {
    // SAFETY: `data` is the `&mut Vec` passed by `named` below, alive for
    // the call; `name` is a NUL-terminated string the shim keeps alive for
    // the callback; `tensor` is a fresh `new at::Tensor`, tch's own
    // representation, whose ownership passes to the Tensor.
    let out = unsafe { &mut *data.cast::<Vec<(String, Tensor)>>() };
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    let tensor = unsafe { Tensor::from_ptr(tensor.cast()) };
    out.push((name, tensor));
}

fn device_index(device: Device) -> Result<c_int, ScriptError> {
    match device {
        Device::Cpu => Ok(-1),
        Device::Cuda(n) => c_int::try_from(n).map_err(|_| ScriptError(format!("cuda:{n}"))),
        other => Err(ScriptError(format!("device {other:?} is not supported"))),
    }
}

/// A loaded TorchScript module. Its parameter and buffer tensors, as
/// [`ScriptModule::named_parameters`] and [`ScriptModule::named_buffers`]
/// return them, share storage with the module: changing them in place
/// changes the module.
pub struct ScriptModule {
    handle: *mut c_void,
}

// SAFETY: a torch::jit::Module may move between threads; ringtrain uses
// each from one thread at a time (its trainer), never concurrently.
unsafe impl Send for ScriptModule {}

impl std::fmt::Debug for ScriptModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptModule").finish_non_exhaustive()
    }
}

impl Drop for ScriptModule {
    fn drop(&mut self) {
        // SAFETY: `handle` came from rt_module_load and is freed once.
        unsafe { rt_module_free(self.handle) }
    }
}

impl ScriptModule {
    /// Loads the bytes of a `.pt` file (torch.jit.save) onto `device`.
    pub fn load(bytes: &[u8], device: Device) -> Result<Self, ScriptError> {
        let device = device_index(device)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: the pointer and length describe `bytes`, which outlives
        // the call; the shim copies what it needs.
        let handle =
            unsafe { rt_module_load(bytes.as_ptr().cast(), bytes.len(), device, &mut err) };
        if let Some(e) = take_error(err) {
            return Err(e);
        }
        if handle.is_null() {
            return Err(ScriptError("loading the module failed".into()));
        }
        Ok(Self { handle })
    }

    fn named(
        &self,
        f: unsafe extern "C" fn(
            *mut c_void,
            *mut c_void,
            TensorCallback,
            *mut *mut c_char,
        ) -> c_int,
    ) -> Result<Vec<(String, Tensor)>, ScriptError> {
        let mut out: Vec<(String, Tensor)> = Vec::new();
        let mut err = std::ptr::null_mut();
        // SAFETY: `handle` is a live module; the callback receives `out`
        // only during this call.
        unsafe {
            f(
                self.handle,
                (&mut out as *mut Vec<(String, Tensor)>).cast(),
                push_named,
                &mut err,
            )
        };
        match take_error(err) {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Every parameter of the module and its submodules, by dotted name
    /// (as `state_dict` names them).
    pub fn named_parameters(&self) -> Result<Vec<(String, Tensor)>, ScriptError> {
        self.named(rt_module_named_parameters)
    }

    /// Every buffer (BatchNorm's running statistics and counter, ...).
    pub fn named_buffers(&self) -> Result<Vec<(String, Tensor)>, ScriptError> {
        self.named(rt_module_named_buffers)
    }

    /// Training mode (dropout on, BatchNorm updating its statistics) or
    /// evaluation mode.
    pub fn set_train(&mut self, on: bool) -> Result<(), ScriptError> {
        let mut err = std::ptr::null_mut();
        // SAFETY: `handle` is a live module.
        unsafe { rt_module_train(self.handle, c_int::from(on), &mut err) };
        take_error(err).map_or(Ok(()), Err)
    }

    /// `forward(inputs...)`, which must return a tensor.
    pub fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor, ScriptError> {
        let ptrs: Vec<*mut c_void> = inputs.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let n = c_int::try_from(ptrs.len()).map_err(|_| ScriptError("too many inputs".into()))?;
        let mut err = std::ptr::null_mut();
        // SAFETY: every input pointer is a live tensor borrowed for the
        // call; the shim only reads them. The result is a fresh tensor we own.
        let out = unsafe { rt_module_forward(self.handle, ptrs.as_ptr(), n, &mut err) };
        if let Some(e) = take_error(err) {
            return Err(e);
        }
        if out.is_null() {
            return Err(ScriptError("forward failed".into()));
        }
        // SAFETY: a fresh `new at::Tensor`, ownership passes to the Tensor.
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }
}
