variable "region" {
  description = "AWS region with the GPU instance type available (p4d: e.g. us-east-1, us-west-2)."
  type        = string
  default     = "us-east-1"
  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must be an AWS region name such as us-east-1."
  }
}

variable "cluster_name" {
  description = "EKS cluster to create, or the existing one to add the GPU node group to (create_cluster = false)."
  type        = string
  default     = "imgtrain"
  validation {
    condition     = can(regex("^[a-zA-Z][a-zA-Z0-9-]{0,99}$", var.cluster_name))
    error_message = "cluster_name must start with a letter and hold only letters, digits and hyphens (max 100)."
  }
}

variable "create_cluster" {
  description = "Create the EKS control plane (true) or add the GPU node group to the existing cluster_name (false)."
  type        = bool
  default     = true
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version of a created cluster."
  type        = string
  default     = "1.30"
  validation {
    condition     = can(regex("^1\\.[0-9]{2}$", var.kubernetes_version))
    error_message = "kubernetes_version must look like 1.30."
  }
}

variable "subnet_ids" {
  description = "Private subnets (at least two, in different AZs) for the control plane; the GPU nodes use the first (one AZ, one cluster placement group, for EFA)."
  type        = list(string)
  validation {
    condition     = length(var.subnet_ids) >= 2 && alltrue([for s in var.subnet_ids : can(regex("^subnet-[0-9a-f]+$", s))])
    error_message = "subnet_ids must list at least two subnet IDs (subnet-...)."
  }
}

variable "endpoint_public_access_cidrs" {
  description = "CIDRs allowed to reach the Kubernetes API endpoint publicly; empty: private endpoint only."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for c in var.endpoint_public_access_cidrs : can(cidrhost(c, 0))])
    error_message = "endpoint_public_access_cidrs must hold CIDR blocks such as 203.0.113.0/24."
  }
}

variable "gpu_instance_type" {
  description = "GPU instance type: p4d/p4de (8x A100) or p5/p5e/p5en (8x H100/H200). All of them have EFA."
  type        = string
  default     = "p4d.24xlarge"
  validation {
    condition     = contains(["p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge"], var.gpu_instance_type)
    error_message = "gpu_instance_type must be one of p4d.24xlarge, p4de.24xlarge, p5.48xlarge, p5e.48xlarge, p5en.48xlarge."
  }
}

variable "gpu_node_min" {
  description = "Fewest GPU nodes the node group scales down to (0: no cost when idle)."
  type        = number
  default     = 0
  validation {
    condition     = var.gpu_node_min >= 0 && var.gpu_node_min <= var.gpu_node_max && floor(var.gpu_node_min) == var.gpu_node_min
    error_message = "gpu_node_min must be a whole number between 0 and gpu_node_max."
  }
}

variable "gpu_node_max" {
  description = "Most GPU nodes (8 GPUs each): 1 to 8 nodes = 8 to 64 GPUs. The job's MAX_NODES must not exceed it."
  type        = number
  default     = 4
  validation {
    condition     = var.gpu_node_max >= 1 && var.gpu_node_max <= 64 && floor(var.gpu_node_max) == var.gpu_node_max
    error_message = "gpu_node_max must be a whole number from 1 to 64."
  }
}

variable "gpu_node_desired" {
  description = "GPU nodes to start with (between gpu_node_min and gpu_node_max)."
  type        = number
  default     = 2
  validation {
    condition     = var.gpu_node_desired >= var.gpu_node_min && var.gpu_node_desired <= var.gpu_node_max
    error_message = "gpu_node_desired must lie between gpu_node_min and gpu_node_max."
  }
}

variable "spot" {
  description = "Use spot capacity for the GPU nodes (cheaper, reclaimed with 2 minutes' notice: imgtrain saves a checkpoint on SIGTERM and the elastic job continues)."
  type        = bool
  default     = false
}

variable "efa" {
  description = "Attach EFA network interfaces to the GPU nodes (every allowed instance type has EFA). Needs the EFA device plugin on the cluster and aws-ofi-nccl in the image."
  type        = bool
  default     = true
}

variable "gpu_disk_size_gb" {
  description = "Root volume of each GPU node (container images, local scratch)."
  type        = number
  default     = 500
  validation {
    condition     = var.gpu_disk_size_gb >= 100 && var.gpu_disk_size_gb <= 16384
    error_message = "gpu_disk_size_gb must be between 100 and 16384."
  }
}

variable "checkpoint_bucket_name" {
  description = "S3 bucket for checkpoints (globally unique)."
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.checkpoint_bucket_name))
    error_message = "checkpoint_bucket_name must be a valid S3 bucket name (3-63 lowercase letters, digits, dots, hyphens)."
  }
}

variable "checkpoint_noncurrent_days" {
  description = "Days an overwritten or deleted checkpoint object version is kept before it expires."
  type        = number
  default     = 7
  validation {
    condition     = var.checkpoint_noncurrent_days >= 1
    error_message = "checkpoint_noncurrent_days must be at least 1."
  }
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}

variable "kubernetes_namespace" {
  description = "Namespace of the job's Kubernetes service account imgtrain, the only one that may assume the checkpoint role (IRSA)."
  type        = string
  default     = "default"
  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.kubernetes_namespace))
    error_message = "kubernetes_namespace must be a Kubernetes namespace name."
  }
}
