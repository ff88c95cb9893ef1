package preflight

import (
	"errors"
	"fmt"
	"strings"

	"github.com/aws/smithy-go"
)

// Check names, as the report shows them.
const (
	CheckCredentials  = "credentials"
	CheckSubnets      = "subnets"
	CheckOfferings    = "type-offered"
	CheckAMI          = "ami"
	CheckLaunch       = "launch-dry-run"
	CheckTagOnLaunch  = "tag-on-launch"
	CheckSpotRole     = "spot-role"
	CheckQueue        = "interruption-queue"
	CheckLocalAPI     = "tailscale-localapi"
	CheckTailscaleKey = "tailscale-api-key"
	CheckHAProxy      = "haproxy-socket"
)

// awsCode is the AWS error code in err ("" if it carries none).
func awsCode(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode()
	}
	return ""
}

// awsText is "Code: message" of an AWS error, else err's text.
func awsText(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode() + ": " + ae.ErrorMessage()
	}
	return err.Error()
}

// credentialCodes are the answers that mean AWS did not accept who is
// calling (rather than what they may do).
var credentialCodes = map[string]bool{
	"AuthFailure": true, "InvalidClientTokenId": true, "SignatureDoesNotMatch": true,
	"ExpiredToken": true, "ExpiredTokenException": true, "UnrecognizedClientException": true,
}

func isDenied(code string) bool {
	return code == "UnauthorizedOperation" || code == "AccessDenied" || code == "AccessDeniedException"
}

// credentialsFix names what to change when AWS does not accept the
// caller, or there is none.
func credentialsFix(err error) string {
	code := awsCode(err)
	switch {
	case code == "":
		return awsText(err) + ": no usable AWS credentials; set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run where an instance role is attached"
	case credentialCodes[code]:
		return awsText(err) + ": AWS rejected the credentials; renew or replace them (AWS_PROFILE, AWS_ACCESS_KEY_ID, the instance role)"
	}
	return awsText(err)
}

// launchFix explains a DryRun RunInstances error in the config's and
// IAM's terms.
func launchFix(err error) string {
	code := awsCode(err)
	text := awsText(err)
	switch {
	case code == "UnauthorizedOperation":
		return text + ": the IAM policy does not allow this launch; grant ec2:RunInstances on instance, volume, network-interface, subnet, security-group and the image/launch-template, and iam:PassRole on the instance profile's role (`aws sts decode-authorization-message` shows what was denied)"
	case credentialCodes[code]:
		return credentialsFix(err)
	case strings.HasPrefix(code, "InvalidAMIID"):
		return text + ": fix [pool.ec2] ami (or the launch template's image): AMIs are per region"
	case strings.HasPrefix(code, "InvalidLaunchTemplate"):
		return text + ": fix [pool.ec2] launch_template_id / launch_template_name / launch_template_version"
	case strings.HasPrefix(code, "InvalidSubnetID"):
		return text + ": fix [pool.ec2] subnets"
	case strings.HasPrefix(code, "InvalidGroup"):
		return text + ": fix [pool.ec2] security_groups (they must be in the subnets' VPC)"
	case strings.HasPrefix(code, "InvalidKeyPair"):
		return text + ": fix [pool.ec2] key_name"
	case code == "InvalidParameterValue" && strings.Contains(strings.ToLower(text), "iaminstanceprofile"):
		return text + ": fix [pool.ec2] instance_profile, or grant iam:PassRole on its role"
	case code == "Unsupported":
		return text + ": the type is not offered there; drop it from instance_types or the subnet from subnets"
	}
	return text
}

// deniedFix is the fix for a read-only call the policy does not allow.
func deniedFix(err error, action string) string {
	return fmt.Sprintf("%s: grant %s to the daemon's IAM identity (preflight only reads)", awsText(err), action)
}
