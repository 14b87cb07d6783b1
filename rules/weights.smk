# Remote files named in params.yaml's `weights:` block (pretrained U-ViT, FID Inception), verified.

# Fetches run where Snakemake runs (a login node has internet; compute nodes often do not).
localrules:
    fetch_weights,


rule fetch_weights:
    output:
        "weights/{filename}",
    params:
        threads=STEP_THREADS["fetch_weights"],
        name=lambda w: next(k for k, v in config["weights"].items() if v["filename"] == w.filename),
        files=PARAMS_ARGS,
    log:
        "logs/weights/{filename}.log",
    conda:
        ENV
    threads: STEP_THREADS["fetch_weights"]
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "python -m diffdistill fetch-weights {params.files} --name {params.name} --out {output} --threads {params.threads} --log-file {log}"
