//! The models, data and optimizers users bring, end to end through
//! `ringtrain local` (a coordinator and workers as processes): TorchScript
//! files uploaded with the job, data sets beyond IDX, the built-in
//! transformer on text, fine-tuning from pretrained weights, and the
//! one-line errors of bad input.

use std::path::Path;

use ringtrain_tests::{
    cnn_spec, examples, export_model, first_and_last, fixture, local, local_output, losses, skip,
    skip_without_data, stderr, FASHION_MNIST,
};

/// A job spec file written for a test.
fn spec_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("spec");
    path.to_string_lossy().into_owned()
}

fn idx_spec(model: &Path) -> String {
    format!(
        "name = \"ts\"\nmodel = \"{}\"\nworkers = 2\nbatch_size = 64\nmax_steps = 60\n\
         [dataset]\nformat = \"idx\"\npath = \"{FASHION_MNIST}\"\n\
         [optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n",
        model.display()
    )
}

fn assert_loss_falls(checkpoint_dir: &str, what: &str) {
    let l = losses(checkpoint_dir);
    let (first, last) = first_and_last(&l, 5);
    assert!(
        last < 0.8 * first,
        "{what}: the loss did not fall ({first:.4} over the first steps, {last:.4} over the last)"
    );
}

/// The error line of a command that must fail.
fn error_line(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "expected failure: {}", stderr(o));
    let err = stderr(o);
    err.lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{err}"))
        .to_string()
}

#[test]
fn a_torchscript_model_with_buffers_trains_and_pytorch_loads_its_checkpoint() {
    if skip_without_data() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(net) = export_model("bn-cnn", &dir.path().join("bn.pt"), &[]) else {
        return;
    };
    let spec = spec_file(dir.path(), "job.toml", &idx_spec(&net));
    let v = local(&spec, 2, &dir.path().join("run"), &[]);
    assert_eq!(v["steps"], 60);
    let ckpt = v["checkpoint_dir"].as_str().expect("dir").to_string();
    assert_loss_falls(&ckpt, "TorchScript BN-CNN on IDX");
    let ours = v["test_accuracy"].as_f64().expect("accuracy");
    assert!(ours > 0.6, "{ours}");
    // The checkpoint is the module's state_dict: PyTorch loads it into the
    // same module and scores the same.
    let Some(theirs) = fixture(&[
        "evaluate",
        net.to_str().expect("path"),
        &ckpt,
        FASHION_MNIST,
    ]) else {
        return;
    };
    let theirs: f64 = theirs.trim().parse().expect("accuracy");
    assert!(
        (ours - theirs).abs() <= 1e-3,
        "ringtrain says {ours}, PyTorch with the checkpoint says {theirs}"
    );
}

#[test]
fn the_torchscript_cnn_and_the_built_in_cnn_agree_from_the_same_weights() {
    if skip_without_data() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(net) = export_model("cnn", &dir.path().join("cnn.pt"), &[]) else {
        return;
    };
    let weights = dir.path().join("cnn.safetensors");
    let Some(_) = fixture(&[
        "state-dict",
        net.to_str().expect("path"),
        weights.to_str().expect("path"),
    ]) else {
        return;
    };
    let sets = ["max_steps=10", "optimizer.lr=0.01", "batch_size=32"];
    let spec = spec_file(dir.path(), "ts.toml", &idx_spec(&net));
    let script = local(&spec, 2, &dir.path().join("script"), &sets);
    let init = format!("init_from={}", weights.display());
    let mut builtin_sets = sets.to_vec();
    builtin_sets.extend(["model=cnn", init.as_str()]);
    let builtin = local(&spec, 2, &dir.path().join("builtin"), &builtin_sets);
    let (a, b) = (
        script["loss"].as_f64().expect("loss"),
        builtin["loss"].as_f64().expect("loss"),
    );
    assert!(
        (a - b).abs() <= 1e-4 * b.abs(),
        "loss after 10 steps: TorchScript {a}, built-in {b}"
    );
}

#[test]
fn every_data_format_trains_across_two_workers() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A TorchScript model on a safetensors data set.
    let data = dir.path().join("tabular");
    std::fs::create_dir_all(&data).expect("dir");
    let Some(_) = fixture(&["safetensors", data.to_str().expect("path")]) else {
        return;
    };
    let Some(net) = export_model(
        "tabular",
        &dir.path().join("tab.pt"),
        &["--inputs", "20", "--classes", "4"],
    ) else {
        return;
    };
    let spec = spec_file(
        dir.path(),
        "tab.toml",
        &format!(
            "name = \"tab\"\nmodel = \"{}\"\nworkers = 2\nbatch_size = 32\nmax_steps = 80\n\
             [dataset]\nformat = \"safetensors\"\npath = \"{}\"\ntest_path = \"{}\"\n\
             [optimizer]\nkind = \"adamw\"\nlr = 0.01\n",
            net.display(),
            data.join("train.safetensors").display(),
            data.join("test.safetensors").display()
        ),
    );
    let v = local(&spec, 2, &dir.path().join("run-tab"), &[]);
    assert_loss_falls(
        v["checkpoint_dir"].as_str().expect("dir"),
        "TorchScript on safetensors",
    );
    assert!(v["test_accuracy"].as_f64().expect("accuracy") > 0.7, "{v}");

    // The built-in CNN on CIFAR-10's layout (3x32x32).
    let cifar = dir.path().join("cifar");
    std::fs::create_dir_all(&cifar).expect("dir");
    let Some(_) = fixture(&["cifar", cifar.to_str().expect("path")]) else {
        return;
    };
    let spec = spec_file(
        dir.path(),
        "cifar.toml",
        &format!(
            "name = \"cifar\"\nmodel = \"cnn\"\nworkers = 2\nbatch_size = 32\nmax_steps = 60\n\
             [dataset]\nformat = \"cifar\"\npath = \"{}\"\n\
             [optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n",
            cifar.display()
        ),
    );
    let v = local(&spec, 2, &dir.path().join("run-cifar"), &[]);
    assert_loss_falls(v["checkpoint_dir"].as_str().expect("dir"), "cnn on cifar");
}

/// Bits per byte of a byte-frequency model of `text`.
fn unigram_entropy(text: &[u8]) -> f64 {
    let mut counts = [0u64; 256];
    for &b in text {
        counts[b as usize] += 1;
    }
    let n = text.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

#[test]
fn the_transformer_learns_english_below_its_unigram_entropy() {
    let corpus = Path::new("/usr/share/games/fortunes/fortunes");
    let data = format!("dataset.path={}", corpus.display());
    if !corpus.is_file() && skip("Debian's fortunes is not installed (scripts/test.sh installs it)")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = examples().join("text-gpt.toml");
    let v = local(
        spec.to_str().expect("path"),
        2,
        &dir.path().join("run"),
        &[
            &data,
            "max_steps=150",
            "model_config.layers=2",
            "model_config.dim=64",
            "dataset.context=32",
            "batch_size=16",
        ],
    );
    let bpb = v["test_bits_per_byte"].as_f64().expect("bits per byte");
    let text = std::fs::read(corpus).expect("corpus");
    let unigram = unigram_entropy(&text[..text.len() * 9 / 10]);
    assert!(
        bpb < unigram,
        "{bpb:.3} bits per byte, unigram entropy {unigram:.3}"
    );
    assert_loss_falls(v["checkpoint_dir"].as_str().expect("dir"), "gpt on text");
    // And it writes.
    let ckpt = v["checkpoint_dir"].as_str().expect("dir");
    let o = ringtrain_tests::run(&["generate", ckpt, "--prompt", "The ", "--tokens", "40"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = ringtrain_tests::stdout(&o);
    assert!(out.starts_with("The ") && out.len() >= 40, "{out:?}");
}

#[test]
fn fine_tuning_a_pretrained_cnn_beats_training_from_scratch() {
    if skip_without_data() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pre = local(
        &cnn_spec(),
        2,
        &dir.path().join("pretrain"),
        &[
            "epochs=0",
            "max_steps=150",
            "dataset.classes=[0, 1, 2, 3, 4]",
            "eval_every_steps=0",
        ],
    );
    let init = format!("init_from={}", pre["checkpoint_dir"].as_str().expect("dir"));
    let subset = [
        "epochs=0",
        "max_steps=40",
        "dataset.classes=[5, 6, 7, 8, 9]",
        "dataset.limit=1000",
        "eval_every_steps=0",
    ];
    let mut tuned = subset.to_vec();
    tuned.extend([init.as_str(), "freeze=[\"c1\", \"c2\"]", "reinit=[\"f2\"]"]);
    let fine = local(&cnn_spec(), 2, &dir.path().join("fine"), &tuned);
    let scratch = local(&cnn_spec(), 2, &dir.path().join("scratch"), &subset);
    let (f, s) = (
        fine["test_accuracy"].as_f64().expect("accuracy"),
        scratch["test_accuracy"].as_f64().expect("accuracy"),
    );
    eprintln!("classes 5-9, 1000 samples, 40 steps: fine-tuned {f:.4}, from scratch {s:.4}");
    assert!(
        f > s,
        "fine-tuning ({f}) must beat training from scratch ({s})"
    );
}

#[test]
fn bad_models_data_and_weights_are_refused_with_one_line() {
    if skip_without_data() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let run = |name: &str, spec: &str, sets: &[&str]| {
        error_line(&local_output(spec, 2, &d.join(name), sets))
    };

    let junk = d.join("junk.pt");
    std::fs::write(&junk, "not a model").expect("write");
    let spec = spec_file(d, "junk.toml", &idx_spec(&junk));
    let e = run("junk", &spec, &[]);
    assert!(e.contains("is not a TorchScript module"), "{e}");

    let Some(three) = export_model("bn-cnn", &d.join("three.pt"), &["--classes", "3"]) else {
        return;
    };
    let spec = spec_file(d, "three.toml", &idx_spec(&three));
    let e = run("three", &spec, &[]);
    assert!(
        e.contains("the model returned [8, 3] (3 classes) but a target is"),
        "{e}"
    );

    let weights = d.join("three.safetensors");
    fixture(&[
        "state-dict",
        three.to_str().expect("path"),
        weights.to_str().expect("path"),
    ]);
    let init = format!("init_from={}", weights.display());
    let e = run("extra", &cnn_spec(), &[&init]);
    assert!(
        e.contains(": has tensor features.0.bias, which the model lacks"),
        "{e}"
    );
    let Some(cnn3) = export_model("cnn", &d.join("cnn3.pt"), &["--classes", "3"]) else {
        return;
    };
    let cnn3_weights = d.join("cnn3.safetensors");
    fixture(&[
        "state-dict",
        cnn3.to_str().expect("path"),
        cnn3_weights.to_str().expect("path"),
    ]);
    let init = format!("init_from={}", cnn3_weights.display());
    let e = run("shape", &cnn_spec(), &[&init]);
    assert!(
        e.contains("tensor f2.bias is [3] there, [10] in the model"),
        "{e}"
    );

    let e = run("freeze", &cnn_spec(), &["freeze=[\"features\"]"]);
    assert!(
        e.contains("freeze prefix 'features' matches no parameter"),
        "{e}"
    );

    let empty = d.join("empty.txt");
    std::fs::write(&empty, "").expect("write");
    let text = format!("dataset.path={}", empty.display());
    let e = run(
        "empty",
        examples().join("text-gpt.toml").to_str().expect("path"),
        &[&text],
    );
    assert!(e.contains("empty text corpus"), "{e}");

    let Some(_) = ringtrain_tests::python(&[
        "-c",
        "import sys, torch; from safetensors.torch import save_file; save_file({'x': torch.zeros(4, 2)}, sys.argv[1])",
        d.join("no-inputs.safetensors").to_str().expect("path"),
    ]) else {
        return;
    };
    let Some(tab) = export_model("tabular", &d.join("tab.pt"), &["--inputs", "2"]) else {
        return;
    };
    let spec = spec_file(
        d,
        "noinputs.toml",
        &format!(
            "name = \"x\"\nmodel = \"{}\"\nworkers = 2\nbatch_size = 4\nmax_steps = 5\n\
             [dataset]\nformat = \"safetensors\"\npath = \"{}\"\n[optimizer]\nkind = \"sgd\"\nlr = 0.1\n",
            tab.display(),
            d.join("no-inputs.safetensors").display()
        ),
    );
    let e = run("noinputs", &spec, &[]);
    assert!(e.contains("no tensor 'inputs'"), "{e}");

    let e = run("tpu", &cnn_spec(), &["device=tpu"]);
    assert!(
        e.contains("unknown device 'tpu' (cpu, cuda or cuda:N)"),
        "{e}"
    );
    if tch_free_gpu_check() {
        let e = run("cuda", &cnn_spec(), &["device=cuda:0"]);
        assert!(
            e.contains("device cuda:0: this worker has no CUDA GPU"),
            "{e}"
        );
    }
}

/// True where this machine has no NVIDIA device (the CUDA refusal is then testable).
fn tch_free_gpu_check() -> bool {
    !Path::new("/dev/nvidia0").exists()
}
