"""The AWS side of fargate-ci on one machine: moto, the Chalice app behind SigV4, an emulated Fargate."""
