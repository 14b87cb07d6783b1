# The paper's tables and figures, rebuilt from the pipeline's own outputs (see results/README.md).


rule report:
    input:
        report_inputs,
    output:
        results=report("results/tables/results.md", caption="../report/results.rst", category="Tables"),
        results_csv="results/tables/results.csv",
        models=report("results/tables/models.md", caption="../report/table1.rst", category="Tables"),
        models_csv="results/tables/models.csv",
        fid=report("results/tables/fid.md", caption="../report/table2.rst", category="Tables"),
        fid_csv="results/tables/fid.csv",
        # one metrics file per dataset, the same keys in each: `dvc metrics show` gets a row per dataset
        metrics=expand("results/{ds}/metrics.json", ds=DATASETS),
        fid_curve=report("results/figures/fid_curve.png", caption="../report/fig3.rst", category="Figures"),
        leaderboard=report("results/figures/leaderboard.png", caption="../report/fig4.rst", category="Figures"),
        grids=report([f for ds in DATASETS for f in class_grid_files(ds)],
                     caption="../report/classes.rst", category="Figures"),
        losses=report(expand("results/figures/{ds}_loss.png", ds=DATASETS),
                      caption="../report/loss.rst", category="Figures"),
        loss_plots=expand("results/plots/{ds}_diffusion_loss.csv", ds=DATASETS),
        fid_plots=expand("results/plots/{ds}_fid_curve.csv", ds=DATASETS),
    params:
        threads=STEP_THREADS["report"],
        files=PARAMS_ARGS,
        datasets=" ".join(DATASETS),
    log:
        "logs/report.log",
    conda:
        ENV
    threads: STEP_THREADS["report"]
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m diffdistill report {params.files} --datasets {params.datasets} --out results --threads {params.threads} --log-file {log}"
