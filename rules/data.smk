# Datasets in one format: data/{ds}/{train,test}.npz; FID reference statistics of the real data.


rule prepare_data:
    output:
        train="data/{ds}/train.npz",
        test="data/{ds}/test.npz",
    params:
        files=PARAMS_ARGS,
        values=step_values("prepare_data"),
    log:
        "logs/{ds}/prepare_data.log",
    benchmark:
        "benchmarks/{ds}/prepare_data.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python -m diffdistill prepare {params.files} --dataset {wildcards.ds}"
        " --out data/{wildcards.ds} --log {log}"


rule fid_stats:
    input:
        train="data/{ds}/train.npz",
        inception=inception_input,
    output:
        "data/{ds}/fid_stats.npz",
    params:
        files=PARAMS_ARGS,
        values=step_values("fid_stats"),
    log:
        "logs/{ds}/fid_stats.log",
    benchmark:
        "benchmarks/{ds}/fid_stats.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=16000,
        runtime=120,
        gpu=lambda w: gpus(w.ds, "sample") and 1,
    shell:
        "python -m diffdistill fid-stats {params.files} --dataset {wildcards.ds}"
        " --train {input.train} --out {output} --log {log}"
