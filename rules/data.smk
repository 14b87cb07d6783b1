# Datasets in one format: data/{ds}/{train,test}.npz; FID reference statistics of the real data.

# Downloads run where Snakemake runs (a login node has internet; compute nodes often do not).
localrules:
    download_data,


# The public archive of a dataset (cifar100, tinyimagenet), fetched and checksum-verified; offline it
# fails naming the URL and the path to place the file at by hand. Conversion is prepare_data's job.
rule download_data:
    output:
        "data/downloads/{ds}/{archive}",
    params:
        threads=STEP_THREADS["download_data"],
        files=PARAMS_ARGS,
        values=step_values("download_data"),
    log:
        "logs/{ds}/download_data_{archive}.log",
    conda:
        ENV
    threads: STEP_THREADS["download_data"]
    resources:
        mem_mb=1000,
        runtime=120,
    shell:
        "python -m diffdistill download {params.files} --dataset {wildcards.ds} --out {output} --threads {params.threads} --log-file {log}"


rule prepare_data:
    input:
        archive=archive_input,
        images=image_tree_input,
    output:
        train="data/{ds}/train.npz",
        test="data/{ds}/test.npz",
    params:
        threads=STEP_THREADS["prepare_data"],
        files=PARAMS_ARGS,
        values=step_values("prepare_data"),
        archive=lambda w, input: f"--archive {input.archive}" if input.archive else "",
    log:
        "logs/{ds}/prepare_data.log",
    benchmark:
        "benchmarks/{ds}/prepare_data.tsv"
    conda:
        ENV
    threads: STEP_THREADS["prepare_data"]
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python -m diffdistill prepare {params.files} --dataset {wildcards.ds} {params.archive}"
        " --out data/{wildcards.ds} --threads {params.threads} --log-file {log}"


# A ConvNet trained on the real training split: its features give fid_convnet, the feature space of
# k-center selection and of the memorisation audit; its softmax the scores of confidence selection.
rule reference_classifier:
    input:
        "data/{ds}/train.npz",
    output:
        "data/{ds}/classifier.pt",
    params:
        threads=STEP_THREADS["reference_classifier"],
        files=PARAMS_ARGS,
        values=step_values("reference_classifier"),
    log:
        "logs/{ds}/reference_classifier.log",
    benchmark:
        "benchmarks/{ds}/reference_classifier.tsv"
    conda:
        ENV
    threads: STEP_THREADS["reference_classifier"]
    resources:
        mem_mb=8000,
        **gpu_job("reference_classifier", runtime=240),
    shell:
        "python -m diffdistill classifier {params.files} --dataset {wildcards.ds}"
        " --train {input} --out {output} --threads {params.threads} --log-file {log}"


rule fid_stats:
    input:
        train="data/{ds}/train.npz",
        inception=inception_input,
        classifier=fid_classifier_input,
    output:
        "data/{ds}/fid_stats.npz",
    params:
        threads=STEP_THREADS["fid_stats"],
        files=PARAMS_ARGS,
        values=step_values("fid_stats"),
        classifier=lambda w, input: f"--classifier {input.classifier}" if input.classifier else "",
    log:
        "logs/{ds}/fid_stats.log",
    benchmark:
        "benchmarks/{ds}/fid_stats.tsv"
    conda:
        ENV
    threads: STEP_THREADS["fid_stats"]
    resources:
        mem_mb=16000,
        **gpu_job("fid_stats", runtime=120),
    shell:
        "python -m diffdistill fid-stats {params.files} --dataset {wildcards.ds}"
        " --train {input.train} {params.classifier} --out {output} --threads {params.threads} --log-file {log}"
