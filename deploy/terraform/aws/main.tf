data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  cluster_name = var.create_cluster ? aws_eks_cluster.this[0].name : data.aws_eks_cluster.existing[0].name
  # EFA interfaces per instance type (p4d/p4de: 4, p5/p5e: 32, p5en: 16); one per network card.
  efa_interfaces = lookup({
    "p4d.24xlarge" = 4, "p4de.24xlarge" = 4,
    "p5.48xlarge"  = 32, "p5e.48xlarge" = 32, "p5en.48xlarge" = 16,
  }, var.gpu_instance_type, 0)
  efa = var.efa && local.efa_interfaces > 0
  # The default key policy, written out: the account administers and uses its keys through IAM policies
  # (such as gpu_node_checkpoints below), no other principal.
  kms_key_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "AccountAdministersThroughIAM"
      Effect    = "Allow"
      Principal = { AWS = "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root" }
      Action    = "kms:*"
      Resource  = "*"
    }]
  })
}

# ---------------------------------------------------------------- EKS control plane (optional)

data "aws_eks_cluster" "existing" {
  count = var.create_cluster ? 0 : 1
  name  = var.cluster_name
}

resource "aws_iam_role" "cluster" {
  count = var.create_cluster ? 1 : 0
  name  = "${var.cluster_name}-eks-cluster"
  assume_role_policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [{ Effect = "Allow", Principal = { Service = "eks.amazonaws.com" }, Action = "sts:AssumeRole" }]
  })
}

resource "aws_iam_role_policy_attachment" "cluster" {
  count      = var.create_cluster ? 1 : 0
  role       = aws_iam_role.cluster[0].name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonEKSClusterPolicy"
}

resource "aws_kms_key" "eks_secrets" {
  count                   = var.create_cluster ? 1 : 0
  description             = "${var.cluster_name}: envelope encryption of Kubernetes secrets"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = local.kms_key_policy
}

resource "aws_eks_cluster" "this" {
  count    = var.create_cluster ? 1 : 0
  name     = var.cluster_name
  version  = var.kubernetes_version
  role_arn = aws_iam_role.cluster[0].arn

  vpc_config {
    subnet_ids              = var.subnet_ids
    endpoint_private_access = true
    endpoint_public_access  = length(var.endpoint_public_access_cidrs) > 0
    public_access_cidrs     = length(var.endpoint_public_access_cidrs) > 0 ? var.endpoint_public_access_cidrs : null
  }
  encryption_config {
    resources = ["secrets"]
    provider {
      key_arn = aws_kms_key.eks_secrets[0].arn
    }
  }
  enabled_cluster_log_types = ["api", "audit", "authenticator", "controllerManager", "scheduler"]

  depends_on = [aws_iam_role_policy_attachment.cluster]
}

# ---------------------------------------------------------------- GPU node group

resource "aws_iam_role" "gpu_node" {
  name = "${var.cluster_name}-gpu-node"
  assume_role_policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [{ Effect = "Allow", Principal = { Service = "ec2.amazonaws.com" }, Action = "sts:AssumeRole" }]
  })
}

resource "aws_iam_role_policy_attachment" "gpu_node" {
  for_each = toset([
    "AmazonEKSWorkerNodePolicy",
    "AmazonEKS_CNI_Policy",
    "AmazonEC2ContainerRegistryReadOnly",
  ])
  role       = aws_iam_role.gpu_node.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/${each.value}"
}

# The GPU nodes' role has no access to the checkpoint bucket: every pod on a node could use it. The job's
# own service account gets it instead (IRSA, "Workload identity for the job" below).

# NCCL over EFA wants the nodes close together: one cluster placement group, one subnet (AZ).
resource "aws_placement_group" "gpu" {
  name     = "${var.cluster_name}-gpu"
  strategy = "cluster"
}

resource "aws_launch_template" "gpu" {
  name_prefix = "${var.cluster_name}-gpu-"

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size = var.gpu_disk_size_gb
      volume_type = "gp3"
      encrypted   = true
    }
  }
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required" # IMDSv2 only
    http_put_response_hop_limit = 1          # pods (one hop more) cannot reach IMDS, so not the node role either
  }
  placement {
    group_name = aws_placement_group.gpu.name
  }
  # One EFA interface per network card; the first is also the node's primary interface.
  dynamic "network_interfaces" {
    for_each = local.efa ? range(local.efa_interfaces) : []
    content {
      device_index          = network_interfaces.value == 0 ? 0 : 1
      network_card_index    = network_interfaces.value
      interface_type        = "efa"
      subnet_id             = var.subnet_ids[0]
      delete_on_termination = true
    }
  }
}

resource "aws_eks_node_group" "gpu" {
  cluster_name    = local.cluster_name
  node_group_name = "${var.cluster_name}-gpu"
  node_role_arn   = aws_iam_role.gpu_node.arn
  subnet_ids      = local.efa ? [var.subnet_ids[0]] : var.subnet_ids
  instance_types  = [var.gpu_instance_type]
  capacity_type   = var.spot ? "SPOT" : "ON_DEMAND"
  ami_type        = "AL2_x86_64_GPU" # NVIDIA driver and container toolkit preinstalled

  scaling_config {
    min_size     = var.gpu_node_min
    max_size     = var.gpu_node_max
    desired_size = var.gpu_node_desired
  }
  launch_template {
    id      = aws_launch_template.gpu.id
    version = aws_launch_template.gpu.latest_version
  }
  # deploy/kubernetes/overlays/aws selects these nodes by this label; only GPU pods tolerate the taint.
  labels = { "imgtrain.io/pool" = "gpu" }
  taint {
    key    = "nvidia.com/gpu"
    value  = "present"
    effect = "NO_SCHEDULE"
  }
  update_config {
    max_unavailable = 1
  }
  lifecycle {
    ignore_changes = [scaling_config[0].desired_size] # the cluster autoscaler owns it after creation
  }

  depends_on = [aws_iam_role_policy_attachment.gpu_node]
}

# ---------------------------------------------------------------- system node group (created cluster only)

# The GPU nodes are tainted: cluster add-ons (CoreDNS, the training operator, Prometheus) need untainted nodes.
resource "aws_eks_node_group" "system" {
  count           = var.create_cluster ? 1 : 0
  cluster_name    = local.cluster_name
  node_group_name = "${var.cluster_name}-system"
  node_role_arn   = aws_iam_role.gpu_node.arn
  subnet_ids      = var.subnet_ids
  instance_types  = ["m6i.xlarge"]
  scaling_config {
    min_size     = 2
    max_size     = 4
    desired_size = 2
  }
  update_config {
    max_unavailable = 1
  }
  depends_on = [aws_iam_role_policy_attachment.gpu_node]
}

# ---------------------------------------------------------------- Workload identity for the job (IRSA)

locals {
  oidc_issuer = var.create_cluster ? aws_eks_cluster.this[0].identity[0].oidc[0].issuer : data.aws_eks_cluster.existing[0].identity[0].oidc[0].issuer
  oidc_host   = replace(local.oidc_issuer, "https://", "")
  # The Kubernetes service account of deploy/kubernetes/overlays/aws (serviceaccount.yaml).
  trainer_subject = "system:serviceaccount:${var.kubernetes_namespace}:imgtrain"
  oidc_provider_arn = var.create_cluster ? aws_iam_openid_connect_provider.eks[0].arn : (
    "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:oidc-provider/${local.oidc_host}"
  )
}

# A created cluster gets its OIDC provider here; an existing cluster has one already (eksctl utils
# associate-iam-oidc-provider). STS verifies EKS issuers through their trusted CA, not this thumbprint.
resource "aws_iam_openid_connect_provider" "eks" {
  count           = var.create_cluster ? 1 : 0
  url             = local.oidc_issuer
  client_id_list  = ["sts.amazonaws.com"]
  thumbprint_list = ["9e99a48a9960b14926bb7f3b02e22da2b0ab7280"]
}

# Only pods running as <kubernetes_namespace>/imgtrain may assume this role, and only this role can use the
# checkpoint bucket.
resource "aws_iam_role" "trainer" {
  name = "${var.cluster_name}-trainer"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Federated = local.oidc_provider_arn }
      Action    = "sts:AssumeRoleWithWebIdentity"
      Condition = {
        StringEquals = {
          "${local.oidc_host}:sub" = local.trainer_subject
          "${local.oidc_host}:aud" = "sts.amazonaws.com"
        }
      }
    }]
  })
}

resource "aws_iam_role_policy" "trainer_checkpoints" {
  name = "imgtrain-checkpoints"
  role = aws_iam_role.trainer.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      { Effect = "Allow", Action = ["s3:ListBucket"], Resource = aws_s3_bucket.checkpoints.arn },
      {
        Effect   = "Allow",
        Action   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
        Resource = "${aws_s3_bucket.checkpoints.arn}/*"
      },
      { Effect = "Allow", Action = ["kms:Decrypt", "kms:GenerateDataKey"], Resource = aws_kms_key.checkpoints.arn },
    ]
  })
}

# ---------------------------------------------------------------- image registry

resource "aws_kms_key" "ecr" {
  description         = "${var.cluster_name}: imgtrain image repository"
  enable_key_rotation = true
  policy              = local.kms_key_policy
}

resource "aws_ecr_repository" "imgtrain" {
  name                 = "${var.cluster_name}/imgtrain"
  image_tag_mutability = "IMMUTABLE" # a tag names one image forever: jobs are reproducible
  image_scanning_configuration {
    scan_on_push = true
  }
  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.ecr.arn
  }
}
