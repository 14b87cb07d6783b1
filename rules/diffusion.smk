# Finetune (or train) the class-conditional U-ViT. Reruns resume from checkpoints/{ds}/state.pt,
# so a preempted Slurm job that is retried continues where it stopped.


rule train_diffusion:
    input:
        train="data/{ds}/train.npz",
        fid_stats="data/{ds}/fid_stats.npz",
        pretrained=pretrained_input,
    output:
        ema="checkpoints/{ds}/ema.pt",
        loss="checkpoints/{ds}/loss.csv",
        fid_curve="checkpoints/{ds}/fid_curve.csv",
        summary="checkpoints/{ds}/train.json",
    params:
        threads=STEP_THREADS["train_diffusion"],
        files=PARAMS_ARGS,
        values=step_values("train_diffusion"),
        launcher=lambda w: (f"torchrun --standalone --nproc_per_node {gpus(w.ds, 'train')} -m diffdistill"
                            if gpus(w.ds, "train") > 1 else "python -m diffdistill"),
    log:
        "logs/{ds}/train_diffusion.log",
    benchmark:
        "benchmarks/{ds}/train_diffusion.tsv"
    conda:
        ENV
    threads: STEP_THREADS["train_diffusion"]
    resources:
        mem_mb=32000,
        **gpu_job("train_diffusion", runtime=2880),
    shell:
        "{params.launcher} train {params.files} --dataset {wildcards.ds}"
        " --data data/{wildcards.ds} --fid-stats {input.fid_stats} --out checkpoints/{wildcards.ds} --threads {params.threads} --log-file {log}"
