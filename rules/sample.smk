# Timed, class-balanced sampling with the EMA weights; subset selection; the challenge's export.


rule sample:
    input:
        ema="checkpoints/{ds}/ema.pt",
    output:
        samples="synthetic/{ds}/samples.npz",
        manifest="synthetic/{ds}/manifest.json",
    params:
        files=PARAMS_ARGS,
        values=step_values("sample"),
    log:
        "logs/{ds}/sample.log",
    benchmark:
        "benchmarks/{ds}/sample.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=16000,
        **gpu_job("sample", runtime=60),
    shell:
        "python -m diffdistill sample {params.files} --dataset {wildcards.ds}"
        " --checkpoint {input.ema} --out synthetic/{wildcards.ds} --log-file {log}"


rule select:
    input:
        samples="synthetic/{ds}/samples.npz",
        classifier=select_classifier_input,
    output:
        "synthetic/{ds}/selected.npz",
    params:
        files=PARAMS_ARGS,
        values=step_values("select"),
        classifier=lambda w, input: f"--classifier {input.classifier}" if input.classifier else "",
    log:
        "logs/{ds}/select.log",
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=16000,
        runtime=60,
    shell:
        "python -m diffdistill select {params.files} --dataset {wildcards.ds}"
        " --samples {input.samples} {params.classifier} --out {output} --log-file {log}"


rule export_challenge:
    input:
        "synthetic/{ds}/selected.npz",
    output:
        images="synthetic/{ds}/challenge/{ds}.pt",         # the name the challenge's evaluator loads
        labels="synthetic/{ds}/challenge/{ds}_labels.pt",
    params:
        files=PARAMS_ARGS,
        values=step_values("export_challenge"),
    log:
        "logs/{ds}/export_challenge.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "python -m diffdistill export {params.files} --dataset {wildcards.ds}"
        " --samples {input} --out {output.images} --labels {output.labels} --log-file {log}"
