# diffdistill: dataset distillation by generation, as one DAG.
#   snakemake --cores all                       the default (embedded digits) run on a laptop
#   snakemake --cores all --profile slurm       on a cluster (see slurm/config.yaml)
# Every rule is one `python -m diffdistill <step>` call; the science lives in src/diffdistill.

from snakemake.utils import min_version

min_version("9.0")

configfile: "params.yaml"

# rules/common.smk validates the config against schemas/params.schema.yaml before any job.


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/weights.smk"
include: "rules/diffusion.smk"
include: "rules/sample.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
