// Package ec2test is an in-process, stateful EC2 for tests of the EC2
// provider and of the daemon built on it: it launches, describes (with tag
// and state filters and pagination) and terminates instances, answers
// capacity shortages and injected errors the way EC2 does, and records
// every call.
package ec2test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/smithy-go"
)

// Operation names of Call.Op and of FailNext.
const (
	OpRun       = "RunInstances"
	OpDescribe  = "DescribeInstances"
	OpTerminate = "TerminateInstances"
)

// Error codes the fake produces itself.
const (
	CodeCapacity    = "InsufficientInstanceCapacity"
	CodeThrottle    = "RequestLimitExceeded"
	CodeNotFound    = "InvalidInstanceID.NotFound"
	CodeMismatch    = "IdempotentParameterMismatch"
	CodeInvalid     = "InvalidParameterValue"
	CodeMissing     = "MissingParameter"
	ReasonUser      = "Client.UserInitiatedShutdown"
	ReasonSpot      = "Server.SpotInstanceTermination"
	defaultPageSize = 1000
)

// APIError is an EC2 error with code and message, as the SDK returns it.
func APIError(code, msg string) error {
	return &smithy.GenericAPIError{Code: code, Message: msg, Fault: smithy.FaultClient}
}

// Call is one recorded call: Input is the *ec2.XxxInput, Err what the fake
// answered.
type Call struct {
	Op    string
	Input any
	Err   error
}

// Fake is a stateful EC2 implementing the provider's API. The zero value
// is not usable; call New. Set the exported fields before use.
type Fake struct {
	// Now is the clock for LaunchTime (nil: time.Now).
	Now func() time.Time
	// PageSize caps DescribeInstances pages below the request's MaxResults
	// (0: MaxResults, or 1000).
	PageSize int
	// BootDescribes is how many DescribeInstances calls a new instance
	// stays pending for; it is running from the one after (0: running at
	// the first DescribeInstances after launch).
	BootDescribes int
	// PublicIPs gives every instance a public address too.
	PublicIPs bool
	// Zones maps subnet ids to availability zones; an unknown subnet gets
	// "us-east-1a", "us-east-1b", ... in order of first use.
	Zones map[string]string
	// Hooks run at the start of every call of their kind; an error they
	// return is the call's answer (and nothing changes).
	RunHook       func(in *ec2.RunInstancesInput) error
	DescribeHook  func(in *ec2.DescribeInstancesInput) error
	TerminateHook func(in *ec2.TerminateInstancesInput) error
	// Images are the AMIs that exist (nil: every image id exists).
	Images []string

	mu         sync.Mutex
	instances  []*instance // in launch order
	byID       map[string]*instance
	tokens     map[string]tokenUse
	fail       map[string][]error
	noCap      []offering
	notOffered [][2]string // instance type, zone (NotOffered)
	calls      []Call
	seq        int
}

type instance struct {
	inst      types.Instance
	volTags   []types.Tag
	describes int // DescribeInstances calls since launch
	// spotCode and spotUpdated are the Spot request's status once
	// MarkForTermination changed it (empty: fulfilled at launch).
	spotCode    string
	spotUpdated time.Time
}

type tokenUse struct {
	params string // fingerprint of the request
	out    *ec2.RunInstancesOutput
	err    error
}

type offering struct{ market, typ, subnet string }

// New returns an empty fake EC2.
func New() *Fake {
	return &Fake{
		Zones:  map[string]string{},
		byID:   map[string]*instance{},
		tokens: map[string]tokenUse{},
		fail:   map[string][]error{},
	}
}

func (f *Fake) now() time.Time {
	if f.Now != nil {
		return f.Now()
	}
	return time.Now()
}

// FailNext makes the next n calls of op answer err.
func (f *Fake) FailNext(op string, n int, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for range n {
		f.fail[op] = append(f.fail[op], err)
	}
}

// NoCapacity makes RunInstances answer InsufficientInstanceCapacity for an
// offering: market ("spot" or "on-demand"), instance type and subnet; an
// empty field matches anything.
func (f *Fake) NoCapacity(market, instanceType, subnet string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.noCap = append(f.noCap, offering{market, instanceType, subnet})
}

// RestoreCapacity undoes every NoCapacity.
func (f *Fake) RestoreCapacity() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.noCap = nil
}

// Calls returns the calls so far.
func (f *Fake) Calls() []Call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

// RunInputs returns the inputs of every RunInstances call so far, failed
// ones included.
func (f *Fake) RunInputs() []*ec2.RunInstancesInput {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*ec2.RunInstancesInput
	for _, c := range f.calls {
		if in, ok := c.Input.(*ec2.RunInstancesInput); ok {
			out = append(out, in)
		}
	}
	return out
}

// CallCount counts the calls of op so far.
func (f *Fake) CallCount(op string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		if c.Op == op {
			n++
		}
	}
	return n
}

// Instances returns every instance, terminated ones included, in launch
// order.
func (f *Fake) Instances() []types.Instance {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]types.Instance, 0, len(f.instances))
	for _, i := range f.instances {
		out = append(out, i.inst)
	}
	return out
}

// Instance returns one instance.
func (f *Fake) Instance(id string) (types.Instance, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i, ok := f.byID[id]
	if !ok {
		return types.Instance{}, false
	}
	return i.inst, true
}

// VolumeTags returns the tags the launch put on an instance's volumes.
func (f *Fake) VolumeTags(id string) []types.Tag {
	f.mu.Lock()
	defer f.mu.Unlock()
	if i, ok := f.byID[id]; ok {
		return slices.Clone(i.volTags)
	}
	return nil
}

// Add inserts an instance as it is (e.g. one without tags, or of another
// cluster). An empty InstanceId gets a fresh one, which Add returns.
func (f *Fake) Add(in types.Instance) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if in.InstanceId == nil {
		in.InstanceId = aws.String(f.newID())
	}
	if in.State == nil {
		in.State = state(types.InstanceStateNameRunning)
	}
	if in.LaunchTime == nil {
		in.LaunchTime = aws.Time(f.now())
	}
	i := &instance{inst: in, describes: f.BootDescribes + 1}
	f.instances = append(f.instances, i)
	f.byID[*in.InstanceId] = i
	return *in.InstanceId
}

// SetState puts an instance into a state, with a StateReason code ("" for
// none).
func (f *Fake) SetState(id string, name types.InstanceStateName, reason string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i, ok := f.byID[id]
	if !ok {
		panic("ec2test: SetState of unknown instance " + id)
	}
	i.inst.State = state(name)
	i.describes = f.BootDescribes + 1 // no automatic pending → running any more
	i.inst.StateReason = nil
	if reason != "" {
		i.inst.StateReason = &types.StateReason{Code: aws.String(reason), Message: aws.String(reason)}
	}
}

// Interrupt reclaims a Spot instance: terminated, StateReason
// Server.SpotInstanceTermination.
func (f *Fake) Interrupt(id string) {
	f.SetState(id, types.InstanceStateNameTerminated, ReasonSpot)
}

func state(name types.InstanceStateName) *types.InstanceState {
	codes := map[types.InstanceStateName]int32{"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}
	return &types.InstanceState{Name: name, Code: aws.Int32(codes[name])}
}

func (f *Fake) newID() string {
	f.seq++
	return fmt.Sprintf("i-%017x", 0xf00000+f.seq)
}

// record appends a call; the caller holds mu.
func (f *Fake) record(op string, in any, err error) {
	f.calls = append(f.calls, Call{Op: op, Input: in, Err: err})
}

// injected pops an error queued by FailNext; the caller holds mu.
func (f *Fake) injected(op string) error {
	q := f.fail[op]
	if len(q) == 0 {
		return nil
	}
	f.fail[op] = q[1:]
	return q[0]
}

// TerminateInstances terminates at once (state terminated, StateReason
// Client.UserInitiatedShutdown). An unknown id fails the whole call with
// InvalidInstanceID.NotFound, like EC2.
func (f *Fake) TerminateInstances(ctx context.Context, in *ec2.TerminateInstancesInput, _ ...func(*ec2.Options)) (*ec2.TerminateInstancesOutput, error) {
	if f.TerminateHook != nil {
		if err := f.TerminateHook(in); err != nil {
			f.mu.Lock()
			f.record(OpTerminate, in, err)
			f.mu.Unlock()
			return nil, err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	out, err := f.terminate(ctx, in)
	f.record(OpTerminate, in, err)
	return out, err
}

func (f *Fake) terminate(ctx context.Context, in *ec2.TerminateInstancesInput) (*ec2.TerminateInstancesOutput, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := f.injected(OpTerminate); err != nil {
		return nil, err
	}
	if len(in.InstanceIds) == 0 {
		return nil, APIError(CodeMissing, "The request must contain the parameter InstanceId")
	}
	for _, id := range in.InstanceIds {
		if _, ok := f.byID[id]; !ok {
			return nil, APIError(CodeNotFound, fmt.Sprintf("The instance ID '%s' does not exist", id))
		}
	}
	out := &ec2.TerminateInstancesOutput{}
	for _, id := range in.InstanceIds {
		i := f.byID[id]
		prev := i.inst.State
		if prev.Name != types.InstanceStateNameTerminated {
			i.inst.State = state(types.InstanceStateNameTerminated)
			i.inst.StateReason = &types.StateReason{Code: aws.String(ReasonUser), Message: aws.String("Client.UserInitiatedShutdown: User initiated shutdown")}
		}
		out.TerminatingInstances = append(out.TerminatingInstances, types.InstanceStateChange{
			InstanceId: aws.String(id), PreviousState: prev, CurrentState: i.inst.State,
		})
	}
	return out, nil
}
