//! Property tests of the job spec parser: a spec arrives from any client, so
//! whatever text or `KEY=VALUE` overrides it holds, parsing answers with a
//! spec or a one-line error, never a panic; and every valid spec survives
//! its own TOML.

use proptest::prelude::*;
use ringtrain_common::jobspec::{
    CheckpointSpec, DataFormat, DatasetSpec, DeviceSpec, JobSpec, LossKind, ModelConfig, ModelKind,
    ModelSource, OnNonFinite, OptimizerKind, OptimizerSpec, Overlap, RingSpecOptions, ScheduleKind,
    ScheduleSpec,
};
use ringtrain_common::wire::{TransportKind, WireEncoding};

const EXAMPLE: &str = r#"
name = "fmnist"
model = "cnn"
batch_size = 64
workers = 4
epochs = 2
[dataset]
format = "idx"
path = "/usr/share/datasets/fashion-mnist"
[optimizer]
kind = "sgd"
lr = 0.05
momentum = 0.9
"#;

/// Keys a spec has (some misspelt), so overrides reach the checks.
const KEYS: &[&str] = &[
    "name",
    "model",
    "loss",
    "device",
    "batch_size",
    "accumulate",
    "epochs",
    "max_steps",
    "workers",
    "min_workers",
    "max_workers",
    "threads",
    "seed",
    "on_nonfinite",
    "init_from",
    "freeze",
    "dataset",
    "dataset.path",
    "dataset.format",
    "dataset.context",
    "dataset.test_fraction",
    "dataset.classes",
    "optimizer",
    "optimizer.lr",
    "optimizer.kind",
    "optimizer.momentum",
    "optimizer.betas",
    "optimizer.clip_grad_norm",
    "schedule.kind",
    "schedule.step_size",
    "model_config.dim",
    "model_config.heads",
    "ring.timeout_s",
    "ring.encoding",
    "ring.compression",
    "ring.overlap",
    "ring.bucket_mb",
    "ring.transport",
    "checkpoint.every_steps",
    "bacth_size",
    "a.b.c",
    "",
];

/// TOML-ish values: numbers at the edges, strings, arrays, tables, junk.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<u64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:e}")),
        Just("1e300".to_string()),
        Just("-0.0".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("18446744073709551616".to_string()),
        Just("[1, 2, \"x\"]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("true".to_string()),
        "[a-z_:0-9.]{0,20}",
        "\\PC{0,40}",
        any::<String>(),
    ]
}

fn override_() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (prop::sample::select(KEYS), value()).prop_map(|(k, v)| format!("{k}={v}")),
        1 => any::<String>(),
    ]
}

/// Lines that look like TOML: keys, tables, values, broken pieces.
fn toml_ish() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        (prop::sample::select(KEYS), value()).prop_map(|(k, v)| format!("{k} = {v}")),
        "\\[[a-z_.]{0,12}\\]",
        "\\[\\[[a-z_.]{0,12}\\]\\]",
        "[a-z_ =\"'\\[\\]{},.0-9#\\\\]{0,30}",
        Just("\"\"\"".to_string()),
    ];
    prop::collection::vec(line, 0..24).prop_map(|lines| lines.join("\n"))
}

/// What a user is told: one line naming the problem.
fn one_line(e: &impl std::fmt::Display) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(!text.is_empty() && !text.contains('\n'), "{:?}", text);
    Ok(())
}

prop_compose! {
    fn optimizer()(
        adamw in any::<bool>(),
        lr in 1e-6f64..10.0,
        momentum in prop_oneof![Just(0.0), 0.0f64..0.99],
        nesterov in any::<bool>(),
        weight_decay in prop::option::of(0.0f64..1.0),
        beta1 in 0.0f64..0.999,
        beta2 in 0.0f64..0.9999,
        eps in 1e-12f64..1e-3,
        clip in prop_oneof![Just(0.0), 0.01f64..100.0],
    ) -> OptimizerSpec {
        OptimizerSpec {
            kind: if adamw { OptimizerKind::Adamw } else { OptimizerKind::Sgd },
            lr,
            momentum: if adamw { 0.0 } else { momentum },
            weight_decay,
            nesterov: !adamw && nesterov && momentum > 0.0,
            betas: [beta1, beta2],
            eps,
            clip_grad_norm: clip,
        }
    }
}

prop_compose! {
    fn schedule(lr: f64)(
        kind in prop::sample::select(&[ScheduleKind::Constant, ScheduleKind::Step, ScheduleKind::Cosine][..]),
        warmup_steps in 0u64..1000,
        step_size in 1u64..1000,
        gamma in 0.0f64..1.0,
        min_share in 0.0f64..1.0,
    ) -> ScheduleSpec {
        ScheduleSpec { kind, warmup_steps, step_size, gamma, min_lr: lr * min_share }
    }
}

prop_compose! {
    fn dataset()(
        format in prop::sample::select(&[DataFormat::Idx, DataFormat::Safetensors, DataFormat::Cifar][..]),
        path in "/[a-z]{1,10}/[a-z.]{1,10}",
        classes in prop::collection::vec(0i64..10, 0..4),
        limit in 0usize..100_000,
    ) -> DatasetSpec {
        DatasetSpec {
            format,
            path,
            test_path: String::new(),
            context: 0,
            test_fraction: 0.1,
            classes,
            limit,
        }
    }
}

prop_compose! {
    fn ring()(
        encoding in prop::sample::select(&[WireEncoding::F32, WireEncoding::F16, WireEncoding::Bf16][..]),
        grpc in any::<bool>(),
        timeout_s in 0.1f64..600.0,
        overlap in prop::sample::select(&[Overlap::Auto, Overlap::Always(true), Overlap::Always(false)][..]),
        bucket_mb in 0.001f64..1024.0,
    ) -> RingSpecOptions {
        RingSpecOptions {
            transport: if grpc { TransportKind::Grpc } else { TransportKind::Tcp },
            encoding,
            timeout_s,
            overlap,
            bucket_mb,
            compression: None,
        }
    }
}

/// (workers, min_workers, max_workers)
fn ring_sizes() -> impl Strategy<Value = (usize, usize, usize)> {
    (1usize..16, 0usize..8).prop_flat_map(|(workers, extra)| {
        let max = if extra == 0 { 0 } else { workers + extra };
        (Just(workers), 0..=workers, Just(max))
    })
}

prop_compose! {
    fn training()(
        batch_size in 1usize..4096,
        accumulate in 1usize..8,
        (epochs, max_steps) in prop_oneof![
            (1u64..100, Just(0u64)),
            (Just(0u64), 1u64..100_000),
            (1u64..100, 1u64..100_000),
        ],
        (workers, min_workers, max_workers) in ring_sizes(),
        keep_global_batch in any::<bool>(),
        // TOML integers are i64: no spec text holds a larger seed.
        seed in 0..=i64::MAX as u64,
        eval_every_steps in 0u64..1000,
        every_steps in 0u64..1000,
        threads in 1usize..8,
        skip in any::<bool>(),
        tensorboard in any::<bool>(),
    ) -> JobSpec {
        JobSpec {
            name: "x".into(),
            model: ModelSource::Builtin(ModelKind::Mlp),
            loss: LossKind::CrossEntropy,
            model_config: ModelConfig::default(),
            device: DeviceSpec::Cpu,
            dataset: DatasetSpec {
                format: DataFormat::Idx,
                path: "/data".into(),
                test_path: String::new(),
                context: 0,
                test_fraction: 0.1,
                classes: Vec::new(),
                limit: 0,
            },
            batch_size,
            accumulate,
            optimizer: OptimizerSpec {
                kind: OptimizerKind::Sgd,
                lr: 0.1,
                momentum: 0.0,
                weight_decay: None,
                nesterov: false,
                betas: [0.9, 0.999],
                eps: 1e-8,
                clip_grad_norm: 0.0,
            },
            schedule: ScheduleSpec::default(),
            epochs,
            max_steps,
            workers,
            min_workers,
            max_workers,
            keep_global_batch,
            audit_samples: false,
            seed,
            eval_every_steps,
            init_from: String::new(),
            strict: true,
            freeze: Vec::new(),
            reinit: Vec::new(),
            checkpoint: CheckpointSpec { dir: String::new(), every_steps, tensorboard },
            ring: RingSpecOptions::default(),
            threads,
            on_nonfinite: if skip { OnNonFinite::SkipStep } else { OnNonFinite::Fail },
        }
    }
}

/// Specs as a user could write them, all of them valid.
fn valid_spec() -> impl Strategy<Value = JobSpec> {
    (
        training(),
        "[a-zA-Z0-9_-]{1,40}",
        prop::sample::select(&[ModelKind::Mlp, ModelKind::Cnn][..]),
        prop::option::of(0usize..8),
        dataset(),
        ring(),
        optimizer(),
    )
        .prop_flat_map(|(spec, name, model, cuda, dataset, ring, optimizer)| {
            let lr = optimizer.lr;
            let spec = JobSpec {
                name,
                model: ModelSource::Builtin(model),
                device: cuda.map_or(DeviceSpec::Cpu, DeviceSpec::Cuda),
                dataset,
                ring,
                optimizer,
                ..spec
            };
            (Just(spec), schedule(lr))
        })
        .prop_map(|(spec, schedule)| JobSpec { schedule, ..spec })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_text_parses_or_is_refused_without_panic(text in prop_oneof![toml_ish(), any::<String>()]) {
        if let Err(e) = JobSpec::parse(&text, &[]) {
            one_line(&e)?;
        }
    }

    #[test]
    fn any_overrides_apply_or_are_refused_without_panic(sets in prop::collection::vec(override_(), 0..6)) {
        match JobSpec::parse(EXAMPLE, &sets) {
            // Whatever an override made of it, an accepted spec is valid.
            Ok(spec) => prop_assert_eq!(spec.validate(), Ok(())),
            Err(e) => one_line(&e)?,
        }
    }

    #[test]
    fn valid_specs_round_trip(spec in valid_spec()) {
        // Bounds of the cluster may refuse a generated spec: only valid ones count.
        prop_assume!(spec.validate().is_ok());
        let text = spec.to_toml();
        prop_assert_eq!(JobSpec::parse(&text, &[]), Ok(spec));
    }
}

/// Deep nesting is refused or parsed, never a stack overflow (which would
/// abort the coordinator, not just fail a request): dotted keys, arrays and
/// inline tables, 100 000 levels deep, in far less than a gRPC message.
#[test]
fn deeply_nested_specs_are_refused_without_overflowing_the_stack() {
    let depth = 100_000;
    let texts = [
        format!("{}b = 1", "a.".repeat(depth)),
        format!("x = {}{}", "[".repeat(depth), "]".repeat(depth)),
        format!("x = {}{}", "{ a = ".repeat(depth), "}".repeat(depth)),
        format!("[{}b]", "a.".repeat(depth)),
    ];
    for text in &texts {
        // A runtime thread's stack, as the coordinator parses on.
        let text = text.clone();
        let parsed = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                JobSpec::parse(&text, &[])
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .expect("thread")
            .join()
            .expect("no panic");
        assert!(parsed.is_err());
    }
    let set = format!("{}b=1", "a.".repeat(depth));
    let err = JobSpec::parse(EXAMPLE, &[set]).unwrap_err().to_string();
    assert!(err.contains("nested deeper than any spec key"), "{err}");
}
