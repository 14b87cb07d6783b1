# Timed, class-balanced sampling with the EMA weights; subset selection; the challenge's export.


rule sample:
    input:
        ema="checkpoints/{ds}/ema.pt",
    output:
        samples="synthetic/{ds}/samples.npz",
        manifest="synthetic/{ds}/manifest.json",
    params:
        threads=STEP_THREADS["sample"],
        files=PARAMS_ARGS,
        values=step_values("sample"),
    log:
        "logs/{ds}/sample.log",
    benchmark:
        "benchmarks/{ds}/sample.tsv"
    conda:
        ENV
    threads: STEP_THREADS["sample"]
    resources:
        mem_mb=16000,
        **gpu_job("sample", runtime=60),
    shell:
        "python -m diffdistill sample {params.files} --dataset {wildcards.ds}"
        " --checkpoint {input.ema} --out synthetic/{wildcards.ds} --threads {params.threads} --log-file {log}"


rule select:
    input:
        samples="synthetic/{ds}/samples.npz",
        classifier=select_classifier_input,
    output:
        "synthetic/{ds}/selected.npz",
    params:
        threads=STEP_THREADS["select"],
        files=PARAMS_ARGS,
        values=step_values("select"),
        classifier=lambda w, input: f"--classifier {input.classifier}" if input.classifier else "",
    log:
        "logs/{ds}/select.log",
    conda:
        ENV
    threads: STEP_THREADS["select"]
    resources:
        mem_mb=16000,
        runtime=60,
    shell:
        "python -m diffdistill select {params.files} --dataset {wildcards.ds}"
        " --samples {input.samples} {params.classifier} --out {output} --threads {params.threads} --log-file {log}"


rule export_challenge:
    input:
        "synthetic/{ds}/selected.npz",
    output:
        images="synthetic/{ds}/challenge/{ds}.pt",         # the name the challenge's evaluator loads
        labels="synthetic/{ds}/challenge/{ds}_labels.pt",
    params:
        threads=STEP_THREADS["export_challenge"],
        files=PARAMS_ARGS,
        values=step_values("export_challenge"),
    log:
        "logs/{ds}/export_challenge.log",
    conda:
        ENV
    threads: STEP_THREADS["export_challenge"]
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "python -m diffdistill export {params.files} --dataset {wildcards.ds}"
        " --samples {input} --out {output.images} --labels {output.labels} --threads {params.threads} --log-file {log}"
