terraform {
  required_version = ">= 1.9" # cross-variable validation (gpu_node_min <= gpu_node_max)
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40, < 7.0"
    }
  }
}

# Credentials come from the environment (AWS_PROFILE, SSO, instance role), never from these files.
provider "aws" {
  region = var.region
  default_tags {
    tags = merge({ "app.kubernetes.io/name" = "imgtrain" }, var.tags)
  }
}
