# The challenge's protocol: a ConvNet trained on a set, tested on the real test split, per seed.
# Three sets per seed: the synthetic (selected) set, the full real training split, and a random
# real subset with the synthetic set's per-class counts. --state: a retried (preempted) job resumes
# from checkpoints/{ds}/eval|sweep/…pt; not an output (it is deleted once the result is written).


rule evaluate:
    input:
        train=eval_train_input,
        like=eval_like_input,
        test="data/{ds}/test.npz",
    output:
        "results/{ds}/eval/{set}_seed{seed}.json",
    params:
        threads=STEP_THREADS["evaluate"],
        files=PARAMS_ARGS,
        values=step_values("evaluate"),
        like=lambda w, input: f"--like {input.like}" if input.like else "",
    log:
        "logs/{ds}/evaluate_{set}_seed{seed}.log",
    benchmark:
        "benchmarks/{ds}/evaluate_{set}_seed{seed}.tsv"
    conda:
        ENV
    threads: STEP_THREADS["evaluate"]
    resources:
        mem_mb=8000,
        **gpu_job("evaluate", runtime=240),
    shell:
        "python -m diffdistill evaluate {params.files} --dataset {wildcards.ds} --set {wildcards.set}"
        " --seed {wildcards.seed} --train {input.train} {params.like} --test {input.test}"
        " --out {output} --state checkpoints/{wildcards.ds}/eval/{wildcards.set}_seed{wildcards.seed}.pt"
        " --threads {params.threads} --log-file {log}"


# DD-Ranking's extra runs (params `ddranking:`): the synthetic set and the random real subset trained
# without augmentation (plain, for the augmentation-robust score) or on the reference classifier's soft
# labels (soft). Their numbers go to their own folders and keys, never into the challenge's columns.
rule evaluate_ddranking:
    input:
        train=eval_train_input,
        like=eval_like_input,
        test="data/{ds}/test.npz",
        teacher=lambda w: ["data/{ds}/classifier.pt"] if w.protocol == "soft" else [],
    output:
        "results/{ds}/eval_{protocol}/{set}_seed{seed}.json",
    wildcard_constraints:
        protocol="plain|soft",
        set="synthetic|random_real",
    params:
        threads=STEP_THREADS["evaluate_ddranking"],
        files=PARAMS_ARGS,
        values=step_values("evaluate_ddranking"),
        like=lambda w, input: f"--like {input.like}" if input.like else "",
        teacher=lambda w, input: f"--teacher {input.teacher}" if input.teacher else "",
    log:
        "logs/{ds}/evaluate_{protocol}_{set}_seed{seed}.log",
    benchmark:
        "benchmarks/{ds}/evaluate_{protocol}_{set}_seed{seed}.tsv"
    conda:
        ENV
    threads: STEP_THREADS["evaluate_ddranking"]
    resources:
        mem_mb=8000,
        **gpu_job("evaluate_ddranking", runtime=240),
    shell:
        "python -m diffdistill evaluate {params.files} --dataset {wildcards.ds} --set {wildcards.set}"
        " --seed {wildcards.seed} --train {input.train} {params.like} --test {input.test}"
        " --protocol {wildcards.protocol} {params.teacher} --out {output}"
        " --state checkpoints/{wildcards.ds}/eval_{wildcards.protocol}/{wildcards.set}_seed{wildcards.seed}.pt"
        " --threads {params.threads} --log-file {log}"


rule summarize:
    input:
        runs=lambda w: expand("results/{ds}/eval/{set}_seed{seed}.json", ds=w.ds,
                              set=["synthetic", "full_real", "random_real"], seed=seeds(w.ds)),
        plain=lambda w: ddranking_runs(w.ds, "plain"),
        soft=lambda w: ddranking_runs(w.ds, "soft"),
    output:
        summary="results/{ds}/summary.json",
        table=report("results/tables/{ds}_summary.md", caption="../report/summary.rst", category="Tables"),
    params:
        threads=STEP_THREADS["summarize"],
        files=PARAMS_ARGS,
        plain=lambda w, input: f"--plain-runs {' '.join(input.plain)}" if input.plain else "",
        soft=lambda w, input: f"--soft-runs {' '.join(input.soft)}" if input.soft else "",
    log:
        "logs/{ds}/summarize.log",
    conda:
        ENV
    threads: STEP_THREADS["summarize"]
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m diffdistill summarize {params.files} --dataset {wildcards.ds} --runs {input.runs}"
        " {params.plain} {params.soft} --out {output.summary} --table {output.table}"
        " --threads {params.threads} --log-file {log}"


rule fid:
    input:
        samples="synthetic/{ds}/samples.npz",
        stats="data/{ds}/fid_stats.npz",
    output:
        "results/{ds}/fid.json",
    params:
        threads=STEP_THREADS["fid"],
        files=PARAMS_ARGS,
        values=step_values("fid"),
    log:
        "logs/{ds}/fid.log",
    benchmark:
        "benchmarks/{ds}/fid.tsv"
    conda:
        ENV
    threads: STEP_THREADS["fid"]
    resources:
        mem_mb=16000,
        **gpu_job("fid", runtime=120),
    shell:
        "python -m diffdistill fid {params.files} --dataset {wildcards.ds} --samples {input.samples}"
        " --stats {input.stats} --out {output} --threads {params.threads} --log-file {log}"


# Beyond the paper: accuracy against images per class. Sampling ran once at the largest size;
# each smaller set is a balanced prefix of it, so the sweep costs no extra sampling.
rule sweep_evaluate:
    input:
        samples="synthetic/{ds}/samples.npz",
        train="data/{ds}/train.npz",
        test="data/{ds}/test.npz",
    output:
        "results/{ds}/sweep/{set}_ipc{n}_seed{seed}.json",
    params:
        threads=STEP_THREADS["sweep_evaluate"],
        files=PARAMS_ARGS,
        values=step_values("sweep_evaluate"),
        source=lambda w, input: (f"--train {input.samples}" if w.set == "synthetic"
                                 else f"--train {input.train} --like {input.samples}"),
    log:
        "logs/{ds}/sweep_{set}_ipc{n}_seed{seed}.log",
    benchmark:
        "benchmarks/{ds}/sweep_{set}_ipc{n}_seed{seed}.tsv"
    conda:
        ENV
    threads: STEP_THREADS["sweep_evaluate"]
    resources:
        mem_mb=8000,
        **gpu_job("sweep_evaluate", runtime=240),
    shell:
        "python -m diffdistill evaluate {params.files} --dataset {wildcards.ds} --set {wildcards.set}"
        " --seed {wildcards.seed} {params.source} --images-per-class {wildcards.n} --test {input.test}"
        " --out {output} --state checkpoints/{wildcards.ds}/sweep/{wildcards.set}_ipc{wildcards.n}_seed{wildcards.seed}.pt"
        " --threads {params.threads} --log-file {log}"


rule sweep_summary:
    input:
        manifest="synthetic/{ds}/manifest.json",
        runs=lambda w: expand("results/{ds}/sweep/{set}_ipc{n}_seed{seed}.json", ds=w.ds,
                              set=["synthetic", "random_real"],
                              n=config[w.ds]["sweep"]["images_per_class"],
                              seed=config[w.ds]["sweep"].get("seeds", seeds(w.ds))),
    output:
        summary="results/{ds}/sweep.json",
        figure=report("results/figures/{ds}_sweep.png", caption="../report/sweep.rst", category="Beyond the paper"),
    params:
        threads=STEP_THREADS["sweep_summary"],
        files=PARAMS_ARGS,
    log:
        "logs/{ds}/sweep_summary.log",
    conda:
        ENV
    threads: STEP_THREADS["sweep_summary"]
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m diffdistill sweep {params.files} --dataset {wildcards.ds} --manifest {input.manifest}"
        " --runs {input.runs} --out {output.summary} --figure {output.figure} --threads {params.threads} --log-file {log}"


rule audit:
    input:
        samples="synthetic/{ds}/samples.npz",
        train="data/{ds}/train.npz",
        test="data/{ds}/test.npz",
        classifier="data/{ds}/classifier.pt",
    output:
        summary="results/{ds}/audit.json",
        hist=report("results/figures/{ds}_audit_distances.png", caption="../report/audit.rst", category="Beyond the paper"),
        pairs=report("results/figures/{ds}_audit_pairs.png", caption="../report/audit_pairs.rst", category="Beyond the paper"),
    params:
        threads=STEP_THREADS["audit"],
        files=PARAMS_ARGS,
    log:
        "logs/{ds}/audit.log",
    benchmark:
        "benchmarks/{ds}/audit.tsv"
    conda:
        ENV
    threads: STEP_THREADS["audit"]
    resources:
        mem_mb=16000,
        **gpu_job("audit", runtime=120),
    shell:
        "python -m diffdistill audit {params.files} --dataset {wildcards.ds} --samples {input.samples}"
        " --train {input.train} --test {input.test} --classifier {input.classifier} --out {output.summary}"
        " --hist {output.hist} --pairs {output.pairs} --threads {params.threads} --log-file {log}"
