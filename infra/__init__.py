"""CloudFormation and IAM for what Chalice does not create; `python -m infra.generate` writes them."""
